"""In a copy of a reproduced repository (conftest's ``tiny_reproduced``: the tiny sample, two
backbones): an experiment that reruns only what it must, into the copy's own store, then a
registration killed midway that the next `dvc repro` finishes. Which stages rerun and what is
registered depend on what changed, not on the size of the sample or how long it trains."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import TINY_PARAMS, run_tool, store_uri, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.scenario]
BACKBONES = tuple(TINY_PARAMS["backbones"])


def _ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns)
        for f in folder.rglob("*")
        if f.is_file()
    }


@pytest.fixture(scope="module")
def copied(tiny_reproduced, tmp_path_factory) -> Path:
    """The reproduced repository copied elsewhere, store and DVC cache included."""
    copy = tmp_path_factory.mktemp("copied") / "pneumo"
    shutil.copytree(tiny_reproduced, copy, symlinks=True)
    return copy


def test_exp_run_in_a_copy_reruns_only_training_and_later_in_the_copys_store(
    tiny_reproduced, copied
):
    root = tiny_reproduced
    before = _files(root / "mlartifacts")
    output = run_tool("dvc", "exp", "run", "-S", "loss.gamma=2.0", cwd=copied)
    later = {f"{stage}@{b}" for stage in ("train", "evaluate") for b in BACKBONES}
    assert _ran_stages(output) == {"validate", *later, "compare", "readme", "register"}
    name = re.search(r"Ran experiment\(s\): (\S+)", output)[1]
    shown = run_tool("dvc", "exp", "show", "--json", cwd=copied)
    assert name in shown and "roc_auc" in shown

    # Logged in the copy's own store, nothing in the original's.
    assert _files(root / "mlartifacts") == before
    mlflow.set_tracking_uri(store_uri(copied))
    runs = mlflow.search_runs(
        experiment_names=["tests"], filter_string=f"tags.dvc_experiment = '{name}'",
        output_format="list",
    )  # fmt: skip
    assert sorted(r.info.run_name for r in runs) == sorted(f"{name}-{b}" for b in BACKBONES)
    assert {r.data.params["loss.gamma"] for r in runs} == {"2.0"}
    for run in runs:
        assert run.info.artifact_uri.startswith((copied / "mlartifacts").as_uri() + "/")
    client = MlflowClient()
    for version in client.search_model_versions("name='pneumo-classifier'"):
        assert str(root) not in client.get_model_version_download_uri(
            "pneumo-classifier", version.version
        )


def _versions(project: Path) -> int:
    with sqlite3.connect(f"file:{project / 'mlflow.db'}?mode=ro", uri=True, timeout=30) as db:
        return db.execute("SELECT count(*) FROM model_versions").fetchone()[0]


def test_a_registration_killed_midway_is_finished_by_the_next_repro(copied):
    """New thresholds give new model folders; the repro is killed after the first of them is
    registered, and the next `dvc repro` registers the rest, each once."""
    before = _versions(copied)
    params = (copied / "params.yaml").read_text()
    (copied / "params.yaml").write_text(params.replace("threshold: youden", "threshold: 0.5"))
    env = tool_env()
    repro = subprocess.Popen(
        ["dvc", "repro"], cwd=copied, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while _versions(copied) == before and repro.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    assert 0 < _versions(copied) - before < len(BACKBONES), "the kill came too late or too early"

    output = run_tool("dvc", "repro", cwd=copied)
    assert "register" in _ran_stages(output)
    mlflow.set_tracking_uri(store_uri(copied))
    versions = MlflowClient().search_model_versions("name='pneumo-classifier'")
    assert len(versions) == before + len(BACKBONES)
    keys = [v.tags["registration_key"] for v in versions]
    assert len(set(keys)) == len(keys)
    record = json.loads((copied / "reports/registry.json").read_text())
    assert sorted(record["versions"]) == sorted(BACKBONES)
    assert all(int(v) > before for v in record["versions"].values())
    assert "Data and pipelines are up to date" in run_tool("dvc", "status", cwd=copied)
