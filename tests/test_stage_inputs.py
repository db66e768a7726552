"""Every stage declares in dvc.yaml what it reads, found by running it.

Each stage's command runs in a subprocess on the tiny project (tests/record_stage.py): the
params keys it reads must be covered by its ``params:`` list and every pneumo module it
imports must be in its ``deps``, or DVC would not rerun it when they change. A run sees the
code paths of the tiny settings (generated data, two backbones), so keys read only for other
sources or backbones are declared by hand on top.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, tool_env

RECORDER = Path(__file__).with_name("record_stage.py")
STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _declared_params(stage: dict) -> list[str]:
    return [key for item in stage.get("params", []) for keys in item.values() for key in keys]


# Where runs are logged, not what a stage computes: pointing the project at a tracking server
# must rerun nothing.
NOT_INPUTS = ("tracking",)


def _covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(f"{d}.") for d in (*declared, *NOT_INPUTS))


@pytest.fixture(scope="module")
def recorded(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """What each stage of dvc.yaml read, run in order on a copy of the tiny project."""
    import shutil

    root = tmp_path_factory.mktemp("inputs") / "project"
    shutil.copytree(tiny_project, root)
    shutil.copy(REPO_ROOT / "README.md", root / "README.md")
    backbone = yaml.safe_load((root / "params.yaml").read_text())["backbones"][0]
    found = {}
    for name, stage in STAGES.items():
        out = root / f"{name}.json"
        command = stage["cmd"].replace("${item.backbone}", backbone).split()
        assert command[0] == "pneumo"
        done = subprocess.run(
            [sys.executable, str(RECORDER), str(out), *command[1:]],
            cwd=root, env=tool_env(), capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, (name, done.stderr[-2000:])
        found[name] = json.loads(out.read_text())
    return found


@pytest.mark.parametrize("name", [name for name in STAGES if name != "validate"])
def test_a_stage_declares_every_param_it_reads(recorded, name):
    read = recorded[name]["params"]
    declared = _declared_params(STAGES[name])
    assert [key for key in read if not _covered(key, declared)] == []


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_depends_on_every_module_it_imports(recorded, name):
    assert sorted(set(recorded[name]["modules"]) - set(STAGES[name]["deps"])) == []


def test_no_stage_takes_the_tracking_store_as_an_input():
    for name, stage in STAGES.items():
        declared = _declared_params(stage) if name != "validate" else []
        assert not [k for k in declared if k.split(".")[0] in NOT_INPUTS], name


def test_the_recorder_sees_what_a_stage_reads(recorded):
    """The checks above are only as good as the recording."""
    assert {"loss.gamma", "train.epochs", "data.image_size"} <= set(recorded["train"]["params"])
    assert "src/pneumo/stages/train.py" in recorded["train"]["modules"]
