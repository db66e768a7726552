"""Resumable training: a killed `pneumo train` or `dvc repro` continues where it stopped, and
only a state of the same settings is resumed (pneumo.core.resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import mlflow
import pytest
import torch
import yaml

from pneumo.config import parse_params
from tests.conftest import (
    TINY_PARAMS,
    kill_after_first_epoch,
    pneumo_process,
    state_epoch,
    tool_env,
    tracked_runs,
    wait_for_epoch,
    write_params,
)


@pytest.mark.slow
@pytest.mark.scenario
def test_training_killed_after_an_epoch_resumes_to_the_identical_checkpoint(tiny_project, tmp_path):
    import shutil

    epochs = 4
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    for project in (uninterrupted, killed):
        shutil.copytree(tiny_project, project)
        shutil.rmtree(project / "checkpoints")
        (project / "mlflow.db").unlink()
        write_params(project, epochs=epochs, patience=epochs)
    assert pneumo_process("train", "resnet50", cwd=uninterrupted).wait() == 0

    kill_after_first_epoch(killed)
    stopped_after = state_epoch(killed)
    assert 1 <= stopped_after < epochs, "the kill came too late to test resuming"
    assert not (killed / "checkpoints/resnet50").exists()
    [interrupted] = tracked_runs(killed)
    assert interrupted.info.status == "RUNNING"  # what SIGKILL leaves behind

    rerun = pneumo_process("train", "resnet50", cwd=killed)
    output = rerun.communicate()[0]
    assert rerun.returncode == 0, output
    assert f"resuming after epoch {stopped_after}" in output

    reference = torch.load(uninterrupted / "checkpoints/resnet50/model.pt", weights_only=True)
    resumed = torch.load(killed / "checkpoints/resnet50/model.pt", weights_only=True)
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name
    for report in ("reports/history/resnet50.csv", "reports/train/resnet50/metrics.json"):
        assert (killed / report).read_text() == (uninterrupted / report).read_text()
    assert not list((killed / ".pneumo/resume").glob("*.pt"))  # finished: state removed

    runs = {run.info.run_id: run for run in tracked_runs(killed)}
    assert runs[interrupted.info.run_id].info.status == "KILLED"
    [resumed_run] = [run for run in runs.values() if run.info.status == "FINISHED"]
    assert resumed_run.data.tags["resumed_from_epoch"] == str(stopped_after)
    assert resumed_run.data.tags["resumed_from_run"] == interrupted.info.run_id
    history = mlflow.MlflowClient().get_metric_history(resumed_run.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, epochs + 1))


@pytest.mark.slow
@pytest.mark.scenario
def test_a_state_from_other_settings_is_never_resumed(project_copy):
    write_params(project_copy, epochs=2, lr=0.01)
    kill_after_first_epoch(project_copy)
    write_params(project_copy, epochs=2, lr=0.002)
    rerun = pneumo_process("train", "resnet50", cwd=project_copy)
    output = rerun.communicate()[0]
    assert rerun.returncode == 0, output
    assert "resuming" not in output and "removing resume state of other settings" in output


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({"registry": {"min_val_auc": 0.9}}, True),
        ({"backbones": ["resnet50"]}, True),
        ({"data": {"local_path": "elsewhere.zip"}}, True),  # the data hash decides
        ({"train": {"num_workers": 3}}, True),
        ({"train": {"resume": False}}, True),
        ({"train": {"device": "cpu"}}, True),  # the resolved device type is what counts
        ({"train": {"nproc": 2}}, True),  # and the actual number of processes
        ({"evaluate": {"tta": ["identity"]}}, True),
        ({"train": {"lr": 0.002}}, False),
        ({"evaluate": {"batch_size": 8}}, False),
        ({"augment": {"rotation": 5.0}}, False),
        ({"seed": 7}, False),
    ],
)
def test_the_resume_key_follows_what_determines_the_training(change, same):
    from pneumo.core.resume import run_key

    reference = run_key(parse_params({}), "resnet50", "abc", "cpu", 1)
    assert (run_key(parse_params(change), "resnet50", "abc", "cpu", 1) == reference) is same
    assert run_key(parse_params({}), "densenet121", "abc", "cpu", 1) != reference
    assert run_key(parse_params({}), "resnet50", "abd", "cpu", 1) != reference
    assert run_key(parse_params({}), "resnet50", "abc", "cuda", 1) != reference
    assert run_key(parse_params({}), "resnet50", "abc", "cpu", 2) != reference


@pytest.mark.slow
@pytest.mark.scenario
def test_a_killed_dvc_repro_continues_training_where_it_stopped(tmp_path):
    """The whole job killed mid-training (DVC and its stage); `dvc repro` resumes the stage."""
    from tests.conftest import copy_repository

    repo = copy_repository(tmp_path / "repo")
    raw = json.loads(json.dumps(TINY_PARAMS))
    raw["backbones"] = ["resnet50"]
    raw["train"] |= {"epochs": 4, "patience": 4}
    # Every key spelled out: DVC reads the params each stage declares from the file itself.
    (repo / "params.yaml").write_text(yaml.safe_dump(parse_params(raw).model_dump(mode="json")))
    env = tool_env()
    job = subprocess.Popen(
        ["dvc", "repro", "train@resnet50"], cwd=repo, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_epoch(repo, job, timeout=600)
    assert job.poll() is None, "dvc repro ended before its first epoch was saved"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    stopped_after = state_epoch(repo)
    assert 1 <= stopped_after < 4, "the kill came too late to test resuming"

    rerun = subprocess.run(
        ["dvc", "repro", "train@resnet50"], cwd=repo, env=env, capture_output=True, text=True
    )
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output
    assert f"resuming after epoch {stopped_after}" in output
    assert "Running stage 'fetch'" not in output  # finished stages stay done
    history = (repo / "reports/history/resnet50.csv").read_text().splitlines()
    assert len(history) == 1 + 4
