"""Runs in MLflow: how they are named and tagged, and how their status stays true when jobs
crash. Where they go (the store, the experiment) is pneumo.mlops.store.

Run status stays true when jobs crash. A run ends FINISHED, FAILED on an error, KILLED on
Ctrl-C or SIGTERM. Runs carry their process (``pneumo.pid``, ``pneumo.host``): one that a
SIGKILL left RUNNING is marked KILLED, tagged ``pneumo.closed_by``, by the next run of its
stage on that host, once its pid is gone. Later stages log into the training run by id and
never change its status.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo.config import TrackingConfig
from pneumo.files import sha256_of
from pneumo.mlops.store import configure, repo_root, with_retries

if TYPE_CHECKING:
    import mlflow

log = logging.getLogger(__name__)

RUNS_DIR = Path(".pneumo/runs")


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def experiment_name() -> str:
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def context_tags(stage: str, data_hash: str) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    return {
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "dvc_experiment": experiment_name(),
        "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "dvc_stage": stage,
        "data_hash": data_hash,
    }


PID_TAG = "pneumo.pid"
HOST_TAG = "pneumo.host"
CLOSED_BY_TAG = "pneumo.closed_by"


def process_tags() -> dict[str, str]:
    """Which process owns a run: a later run of the stage closes it once that process is gone."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def process_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that owns a run still runs; None when this host cannot tell (a run
    of another host, or one logged before runs carried the tags). A zombie (killed, not yet
    reaped by its parent) counts as gone."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return None
    pid = int(tags[PID_TAG])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): the pid exists
        return True


@contextmanager
def start_run(
    config: TrackingConfig, *, run_name: str, tags: dict[str, str]
) -> Iterator[mlflow.ActiveRun]:
    """A new run, tagged with its process, that ends FINISHED, KILLED when interrupted
    (Ctrl-C, or SIGTERM through pneumo.interrupts) or FAILED on any other exception.

    Runs of the same stage (tag ``dvc_stage``) that a SIGKILL left RUNNING are closed first.
    """
    import mlflow

    configure(config)
    run = with_retries(lambda: mlflow.start_run(run_name=run_name, tags=tags | process_tags()))
    try:
        if "dvc_stage" in tags:
            close_abandoned_runs(run.info.experiment_id, tags["dvc_stage"], run.info.run_id)
        yield run
    except KeyboardInterrupt:
        _end_active_run("KILLED")
        raise
    except BaseException:
        _end_active_run("FAILED")
        raise
    _end_active_run("FINISHED")


def _end_active_run(status: str) -> None:
    import mlflow

    with_retries(lambda: mlflow.end_run(status))


def close_abandoned_runs(experiment_id: str, stage: str, closed_by: str) -> list[str]:
    """Mark KILLED the runs of ``stage`` that are RUNNING although their process is gone
    (SIGKILL, out of memory, a crashed machine); returns their ids.

    Runs whose process is alive (parallel `dvc exp run` jobs) are left as they are, and so are
    runs this host cannot judge (another host's). Best effort: a failure here only warns.
    """
    import mlflow

    client = mlflow.MlflowClient()
    try:
        running = with_retries(
            lambda: client.search_runs(
                [experiment_id],
                filter_string=f"tags.dvc_stage = '{stage}' and attributes.status = 'RUNNING'",
            )
        )
        abandoned = [
            run.info.run_id
            for run in running
            if run.info.run_id != closed_by and process_alive(run.data.tags) is False
        ]
        for run_id in abandoned:
            close_run(run_id, status="KILLED", closed_by=closed_by)
    except Exception:
        log.warning("could not look for abandoned runs of %s", stage, exc_info=True)
        return []
    return abandoned


def find_run(config: TrackingConfig, run_id: str | None) -> str | None:
    """``run_id`` if this store has the run, else None (with a warning).

    Later stages log into the training run by id (``run_id=`` of the log functions below)
    without starting it again: starting it would make it RUNNING, and a crash there would
    leave it FAILED or RUNNING although the training finished.
    """
    import mlflow

    if run_id is None:
        return None
    configure(config)
    try:
        with_retries(lambda: mlflow.get_run(run_id))
    except mlflow.exceptions.MlflowException:
        log.warning("MLflow run %s is not in %s: nothing logged", run_id, mlflow.get_tracking_uri())
        return None
    return run_id


def close_run(run_id: str, *, status: str, closed_by: str) -> None:
    """End a run that a killed process left RUNNING, tagged with the run that closed it.
    Runs that have ended, or whose process still runs, are left as they are. Call after
    :func:`configure`."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        run = with_retries(lambda: client.get_run(run_id))
    except mlflow.exceptions.MlflowException:
        log.warning(
            "MLflow run %s is not in %s: nothing to close", run_id, mlflow.get_tracking_uri()
        )
        return
    if run.info.status != "RUNNING":
        return
    if process_alive(run.data.tags):
        log.warning(
            "MLflow run %s is RUNNING in process %s on this host: left open",
            run_id, run.data.tags[PID_TAG],
        )  # fmt: skip
    else:
        with_retries(lambda: client.set_tag(run_id, CLOSED_BY_TAG, closed_by))
        with_retries(lambda: client.set_terminated(run_id, status))
        log.info("marked the interrupted MLflow run %s as %s", run_id, status)


def _run_index(checkpoint: Path) -> Path:
    return repo_root() / RUNS_DIR / f"{sha256_of(checkpoint)[:24]}.json"


def remember_training_run(checkpoint: Path, run_id: str) -> None:
    """Note which MLflow run trained ``checkpoint``, outside every DVC output.

    The run id is not a fact about the model: kept in the model folder, it would change the
    folder's hash on every rerun (so a fresh clone's `dvc repro` would rewrite dvc.lock).
    The note is keyed by the checkpoint's content, in the repository root's ``.pneumo/``,
    so queued experiments and checkpoints restored from DVC's run cache find it too.
    """
    index = _run_index(checkpoint)
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"mlflow_run_id": run_id}) + "\n")


def training_run_of(checkpoint: Path) -> str | None:
    """The MLflow run that trained ``checkpoint``, if this repository trained it."""
    index = _run_index(checkpoint)
    if not index.is_file():
        log.warning(
            "no MLflow training run is recorded here for %s (trained in another clone?)",
            checkpoint,
        )
        return None
    return json.loads(index.read_text())["mlflow_run_id"]


def create_run(config: TrackingConfig, *, run_name: str, tags: dict[str, str]) -> str:
    """A run that no process holds as its active run (e.g. a study that several workers share,
    each logging into it by id); it stays RUNNING until :func:`set_status` ends it."""
    import mlflow

    experiment_id = configure(config)
    client = mlflow.MlflowClient()
    run = with_retries(lambda: client.create_run(experiment_id, tags=tags, run_name=run_name))
    return run.info.run_id


def run_status(run_id: str) -> str:
    import mlflow

    return with_retries(lambda: mlflow.MlflowClient().get_run(run_id)).info.status


def set_status(run_id: str, status: str) -> None:
    """RUNNING, or an end: FINISHED, FAILED, KILLED."""
    import mlflow

    client = mlflow.MlflowClient()
    if status == "RUNNING":
        with_retries(lambda: client.update_run(run_id, status=status))
    else:
        with_retries(lambda: client.set_terminated(run_id, status))


def set_tags(tags: dict[str, str], *, run_id: str | None = None) -> None:
    import mlflow

    if run_id is None:
        with_retries(lambda: mlflow.set_tags(tags))
        return
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        with_retries(lambda k=key, v=value: client.set_tag(run_id, k, v))


def log_params(params: dict[str, Any], *, run_id: str | None = None) -> None:
    import mlflow

    with_retries(lambda: mlflow.log_params(params, run_id=run_id))


def log_metrics(
    metrics: dict[str, float], step: int | None = None, *, run_id: str | None = None
) -> None:
    """Into ``run_id``, or the active run when None (the same holds for the functions below)."""
    import mlflow

    with_retries(lambda: mlflow.log_metrics(metrics, step=step, run_id=run_id))


def log_artifacts(
    files: list[Path], artifact_path: str | None = None, *, run_id: str | None = None
) -> None:
    import mlflow

    for file in files:
        with_retries(
            lambda f=file: mlflow.log_artifact(str(f), artifact_path=artifact_path, run_id=run_id)
        )


def log_dict(data: dict, name: str) -> None:
    import mlflow

    with_retries(lambda: mlflow.log_dict(data, name))
