"""The default DVC remote: a folder beside the repository, shared by the clones in one folder.

End to end in a copy of a reproduced repository (conftest's ``tiny_reproduced``): `dvc push`,
`git clone` beside the copy, `dvc pull` there; the clone has nothing left to do and predicts
what the original does. The copy's remote lands beside the
copy, never in the developer's own storage.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import BATCH_TOLERANCE, REPO_ROOT, TINY_PARAMS, run_tool

BIN = Path(sys.executable).parent
GIT = ("git", "-c", "user.name=pneumo-tests", "-c", "user.email=tests@pneumo.invalid")
STORAGE = "pneumo-dvc-storage"  # the default remote's folder, beside the repository
BACKBONES = tuple(TINY_PARAMS["backbones"])
RAW = "data/raw/"  # predictions.csv names images relative to it


def _default_remote(dvc_dir: Path) -> tuple[str, Path]:
    """The name and resolved folder of the default remote in a repository's .dvc/config."""
    from dvc.config import Config

    conf = Config(dvc_dir=str(dvc_dir), validate=False).load_one("repo")
    name = conf["core"]["remote"]
    return name, Path(conf["remote"][name]["url"])


def test_the_committed_default_remote_is_a_folder_beside_the_repository():
    """Works with no set-up, and keeps test copies off shared storage: a team store is chosen
    per clone (`dvc remote default --local`), never as the committed default."""
    name, url = _default_remote(REPO_ROOT / ".dvc")
    assert url == REPO_ROOT.parent / STORAGE, name
    committed = (REPO_ROOT / ".dvc/config").read_text()
    for secret in ("access_key_id", "secret_access_key", "session_token", "password"):
        assert secret not in committed, f"{secret}: use `dvc remote modify --local`"


def _predict(root: Path, backbone: str, image: str) -> float:
    output = run_tool(
        "pneumo", "predict", "--model", f"models/{backbone}", "--output", "json", image, cwd=root
    )
    rows, _ = json.JSONDecoder().raw_decode(output, output.index("["))  # stdout, then stderr
    assert len(rows) == 1 and not rows[0].get("error"), rows
    return rows[0]["probability"]


def _evaluated_probability(root: Path, backbone: str, image: str) -> float:
    """The probability `evaluate` wrote for ``image`` in the test predictions (a DVC output)."""
    with open(root / f"reports/eval/{backbone}/predictions.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["image"] == image.removeprefix(RAW)]
    assert len(rows) == 1, image
    return float(rows[0]["probability"])


@pytest.mark.slow
@pytest.mark.scenario
def test_push_then_pull_into_a_fresh_clone_leaves_nothing_to_do(tiny_reproduced, tmp_path):
    root = tmp_path / "pneumo"
    shutil.copytree(tiny_reproduced, root, symlinks=True)
    # The copy's default remote is beside the copy: tests never write the developer's storage.
    name, storage = _default_remote(root / ".dvc")
    assert storage == tmp_path / STORAGE
    listed = run_tool("dvc", "remote", "list", cwd=root)
    assert "".join(listed.split()) == f"{name}{storage}(default)"  # DVC wraps long lines

    assert tuple(yaml.safe_load((root / "params.yaml").read_text())["backbones"]) == BACKBONES
    # The results as a commit (on another platform than the committed one, they differ).
    run_tool("git", "add", "-A", cwd=root)
    run_tool(*GIT, "commit", "-qm", "results", "--allow-empty", cwd=root)
    assert run_tool("git", "status", "--porcelain", cwd=root) == ""

    assert not storage.exists()
    pushed = run_tool("dvc", "push", cwd=root)
    assert "files pushed" in pushed, pushed
    assert (storage / "files/md5").is_dir()
    assert "in sync" in run_tool("dvc", "status", "--cloud", cwd=root)

    clone = tmp_path / "clone"
    run_tool("git", "clone", "-q", str(root), str(clone), cwd=tmp_path)
    assert _default_remote(clone / ".dvc")[1] == storage  # the same folder, beside both
    assert not (clone / "models").exists()
    pulled = run_tool("dvc", "pull", cwd=clone)
    assert "Everything is up to date" not in pulled, pulled
    assert "Data and pipelines are up to date." in run_tool("dvc", "status", cwd=clone)
    assert run_tool("git", "status", "--porcelain", cwd=clone) == ""

    image = str(sorted((clone / "data/raw/test/PNEUMONIA").iterdir())[0].relative_to(clone))
    assert (root / image).read_bytes() == (clone / image).read_bytes()
    for backbone in BACKBONES:  # every file of every model folder, byte for byte
        folder = Path("models") / backbone
        assert {f.name: f.read_bytes() for f in (clone / folder).iterdir()} == {
            f.name: f.read_bytes() for f in (root / folder).iterdir()
        }, backbone
    # One of them predicts what the original evaluated, and what `pneumo predict` says in the
    # original (~5 s a process: the same bytes make the others' predictions the same).
    backbone = BACKBONES[1]
    probability = _predict(clone, backbone, image)
    evaluated = _evaluated_probability(root, backbone, image)
    assert probability == pytest.approx(evaluated, abs=BATCH_TOLERANCE)
    assert _predict(root, backbone, image) == probability

    # The clone has the outputs but not the original's tracking store: registering there logs
    # each model in a new run that names its weights, and the registry serves it.
    assert not (clone / "mlflow.db").exists()
    registered = run_tool("pneumo", "register", cwd=clone)
    assert "is not in this tracking store" in registered and "Traceback" not in registered
    run_tool("pneumo", "promote", "--force", cwd=clone)  # tiny models: below the AUC floor
    record = json.loads((clone / "reports/registry.json").read_text())
    [backbone] = [b for b, v in record["versions"].items() if v == record["challenger"]]
    output = run_tool("pneumo", "predict", "--output", "json", image, cwd=clone)
    rows, _ = json.JSONDecoder().raw_decode(output, output.index("["))
    evaluated = _evaluated_probability(root, backbone, image)
    assert rows[0]["probability"] == pytest.approx(evaluated, abs=BATCH_TOLERANCE)
