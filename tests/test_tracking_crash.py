"""MLflow runs stay consistent when jobs crash: SIGTERM, SIGKILL, failures in later stages."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pneumo.config import TrackingConfig
from pneumo.interrupts import EXIT_STATUS
from pneumo.mlops import store, tracking
from tests.conftest import (
    kill_after_first_epoch,
    pneumo_process,
    run_cli,
    state_epoch,
    store_uri,
    tracked_runs,
    wait_for_epoch,
    write_params,
)

STAGE = "train@resnet50"


def _fresh_training(project: Path, **train) -> None:
    """No resnet50 checkpoint and an empty tracking store: the runs seen are the test's."""
    shutil.rmtree(project / "checkpoints/resnet50")
    (project / "mlflow.db").unlink()
    write_params(project, **train)


def _status(project: Path) -> dict[str, str]:
    return {run.info.run_id: run.info.status for run in tracked_runs(project)}


@pytest.mark.slow
@pytest.mark.scenario
def test_sigterm_during_training_ends_the_run_as_killed_and_writes_no_checkpoint(project_copy):
    _fresh_training(project_copy, epochs=4, patience=4)
    process = pneumo_process("train", "resnet50", cwd=project_copy)
    stopped_after = wait_for_epoch(project_copy, process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]

    assert 1 <= stopped_after < 4, "the signal came too late"
    assert process.returncode == EXIT_STATUS, output
    assert "stopped by signal SIGTERM before the stage finished" in output
    # No resnet50 model and no staging folder: only the other backbone's checkpoint.
    assert [p.name for p in (project_copy / "checkpoints").iterdir()] == ["efficientnet-b0"]
    [run] = tracked_runs(project_copy)
    assert run.info.status == "KILLED"
    assert state_epoch(project_copy) >= 1  # the saved state still resumes


@pytest.mark.slow
@pytest.mark.scenario
def test_a_run_left_running_by_sigkill_is_closed_by_the_next_training_of_its_stage(project_copy):
    _fresh_training(project_copy, epochs=2, patience=2)
    kill_after_first_epoch(project_copy)
    [killed] = tracked_runs(project_copy)
    assert killed.info.status == "RUNNING"  # what SIGKILL leaves behind

    write_params(project_copy, epochs=2, patience=2, resume=False)
    rerun = pneumo_process("train", "resnet50", cwd=project_copy)
    output = rerun.communicate()[0]
    assert rerun.returncode == 0, output
    assert "resuming" not in output

    runs = {run.info.run_id: run for run in tracked_runs(project_copy)}
    [new] = [run_id for run_id in runs if run_id != killed.info.run_id]
    assert {run_id: run.info.status for run_id, run in runs.items()} == {
        killed.info.run_id: "KILLED",
        new: "FINISHED",
    }
    assert runs[killed.info.run_id].data.tags[tracking.CLOSED_BY_TAG] == new
    assert "resumed_from_run" not in runs[new].data.tags


def _reaped() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _zombie() -> subprocess.Popen:
    """A killed child not yet reaped: os.kill(pid, 0) still succeeds on it."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.kill()
    stat = Path(f"/proc/{child.pid}/stat")
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    return child


def test_only_runs_whose_process_is_gone_are_closed(in_tmp):
    """Given RUNNING runs of the stage whose process is alive (a parallel job), gone, a zombie
    or on another host, when the stage starts a run, only the gone ones are closed."""
    config = TrackingConfig(experiment="tests")
    experiment_id = store.configure(config)
    client = MlflowClient()
    here = socket.gethostname()
    zombie = _zombie()

    def running(stage: str, pid: int, host: str = here) -> str:
        tags = {"dvc_stage": stage, tracking.PID_TAG: str(pid), tracking.HOST_TAG: host}
        return client.create_run(experiment_id, tags=tags).info.run_id

    alive = running(STAGE, pid=os.getpid())
    gone = running(STAGE, pid=_reaped())
    killed_unreaped = running(STAGE, pid=zombie.pid)
    elsewhere = running(STAGE, pid=_reaped(), host=f"not-{here}")
    other_stage = running("train@densenet121", pid=_reaped())
    untagged = client.create_run(experiment_id, tags={"dvc_stage": STAGE}).info.run_id

    with tracking.start_run(config, run_name="next", tags={"dvc_stage": STAGE}) as run:
        pass
    zombie.wait()

    status = {r: client.get_run(r).info.status for r in (alive, gone, killed_unreaped)}
    status |= {r: client.get_run(r).info.status for r in (elsewhere, other_stage, untagged)}
    assert status == {
        alive: "RUNNING",
        gone: "KILLED",
        killed_unreaped: "KILLED",
        elsewhere: "RUNNING",
        other_stage: "RUNNING",
        untagged: "RUNNING",
    }
    for closed in (gone, killed_unreaped):
        assert client.get_run(closed).data.tags[tracking.CLOSED_BY_TAG] == run.info.run_id
    new = client.get_run(run.info.run_id)
    assert new.info.status == "FINISHED"
    assert new.data.tags[tracking.PID_TAG] == str(os.getpid())


def test_an_interrupted_run_ends_killed_and_a_failed_one_failed(in_tmp):
    config = TrackingConfig(experiment="tests")
    store.configure(config)
    ended = {}
    for error in (KeyboardInterrupt, RuntimeError):
        with (
            pytest.raises(error),
            tracking.start_run(config, run_name=error.__name__, tags={}) as run,
        ):
            raise error
        ended[error] = MlflowClient().get_run(run.info.run_id).info.status
    assert ended == {KeyboardInterrupt: "KILLED", RuntimeError: "FAILED"}
    assert mlflow.active_run() is None


@pytest.mark.parametrize("error", [RuntimeError("store unreachable"), KeyboardInterrupt()])
def test_a_failure_while_evaluate_logs_leaves_the_training_run_finished(
    project_copy, monkeypatch, error
):
    training_run = tracking.training_run_of(project_copy / "checkpoints/resnet50/model.pt")

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr("pneumo.mlops.tracking.log_artifacts", failing)
    if isinstance(error, KeyboardInterrupt):
        assert run_cli("evaluate", "resnet50").exit_code != 0  # click: "Aborted!"
    else:
        with pytest.raises(RuntimeError, match="store unreachable"):
            run_cli("evaluate", "resnet50")

    mlflow.set_tracking_uri(store_uri(project_copy))
    run = mlflow.get_run(training_run)
    assert run.info.status == "FINISHED"
    assert "test_roc_auc" in run.data.metrics  # logged into it before the failure
    assert mlflow.active_run() is None


@pytest.mark.slow
def test_registering_logs_the_model_into_the_training_run_and_leaves_it_finished(project_copy):
    assert run_cli("compare").exit_code == 0
    before = _status(project_copy)
    result = run_cli("register")
    assert result.exit_code == 0, result.output

    assert _status(project_copy) == before  # every run FINISHED as before, no new run
    client = MlflowClient()
    for version in client.search_model_versions("name='pneumo-classifier'"):
        backbone = version.tags["backbone"]
        trained = tracking.training_run_of(project_copy / f"checkpoints/{backbone}/model.pt")
        assert version.run_id == trained
        outputs = client.get_run(trained).outputs.model_outputs
        assert version.source in {f"models:/{output.model_id}" for output in outputs}
