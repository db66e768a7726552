"""The only module that talks to MLflow tracking: where runs go, how they are named and tagged.

By default runs go to ``sqlite:///<repo root>/mlflow.db`` with artifacts in
``<repo root>/mlartifacts``. The root is ``DVC_ROOT`` when DVC sets it, else the nearest folder
above the working directory holding dvc.yaml. Queued and ``--temp`` experiments run in copies
under ``<repo>/.dvc/tmp/exps/``; those resolve to the repository that owns the copy, so every
execution logs to one database.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pneumo.config import TrackingConfig

if TYPE_CHECKING:
    import mlflow

log = logging.getLogger(__name__)
T = TypeVar("T")

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
RUNS_DIR = Path(".pneumo/runs")


def repo_root(start: Path | None = None) -> Path:
    env_root = os.environ.get("DVC_ROOT")
    here = Path(env_root) if env_root else (start or Path.cwd())
    here = here.resolve()
    if not env_root:
        here = next((p for p in (here, *here.parents) if (p / "dvc.yaml").is_file()), here)
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 2] == (".dvc", "tmp"):
            return Path(*parts[:i])
    return here


def tracking_uri(config: TrackingConfig, root: Path | None = None) -> str:
    if config.uri:
        return config.uri
    return f"sqlite:///{(root or repo_root()) / DB_FILE}"


def with_retries(call: Callable[[], T], attempts: int = 8, delay: float = 0.5) -> T:
    """Retry SQLite's "database is locked" when parallel experiments log at once."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if "locked" not in str(exc).lower() or attempt == attempts:
                raise
            log.warning("tracking database busy, retrying (%d/%d)", attempt, attempts)
            time.sleep(delay * attempt)
    raise AssertionError("unreachable")


def configure(config: TrackingConfig) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    import mlflow

    root = repo_root()
    mlflow.set_tracking_uri(tracking_uri(config, root))
    experiment = with_retries(lambda: mlflow.get_experiment_by_name(config.experiment))
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        artifacts = (root / ARTIFACTS_DIR).resolve().as_uri()
        try:
            experiment_id = with_retries(
                lambda: mlflow.create_experiment(config.experiment, artifact_location=artifacts)
            )
        except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel run
            experiment_id = mlflow.get_experiment_by_name(config.experiment).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


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


@contextmanager
def start_run(
    config: TrackingConfig, *, run_name: str, tags: dict[str, str]
) -> Iterator[mlflow.ActiveRun]:
    import mlflow

    configure(config)
    with with_retries(lambda: mlflow.start_run(run_name=run_name, tags=tags)) as run:
        yield run


@contextmanager
def resume_run(config: TrackingConfig, run_id: str | None) -> Iterator[mlflow.ActiveRun | None]:
    """Reopen a training run by id; yields None (and warns) if this store does not have it."""
    import mlflow

    if run_id is None:
        yield None
        return
    configure(config)
    try:
        with_retries(lambda: mlflow.get_run(run_id))
    except mlflow.exceptions.MlflowException:
        log.warning("MLflow run %s is not in %s: nothing logged", run_id, mlflow.get_tracking_uri())
        yield None
        return
    with with_retries(lambda: mlflow.start_run(run_id=run_id)) as run:
        yield run


def close_run(config: TrackingConfig, run_id: str, *, status: str) -> None:
    """End a run that a killed process left RUNNING; other runs are left as they are."""
    import mlflow

    configure(config)
    client = mlflow.MlflowClient()
    try:
        run = with_retries(lambda: client.get_run(run_id))
    except mlflow.exceptions.MlflowException:
        log.warning(
            "MLflow run %s is not in %s: nothing to close", run_id, mlflow.get_tracking_uri()
        )
        return
    if run.info.status == "RUNNING":
        with_retries(lambda: client.set_terminated(run_id, status))
        log.info("marked the interrupted MLflow run %s as %s", run_id, status)


def _run_index(checkpoint: Path) -> Path:
    digest = hashlib.sha256()
    with checkpoint.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return repo_root() / RUNS_DIR / f"{digest.hexdigest()[:24]}.json"


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


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    with_retries(lambda: mlflow.log_params(params))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    with_retries(lambda: mlflow.log_metrics(metrics, step=step))


def log_artifacts(files: list[Path], artifact_path: str | None = None) -> None:
    import mlflow

    for file in files:
        with_retries(lambda f=file: mlflow.log_artifact(str(f), artifact_path=artifact_path))


def log_dict(data: dict, name: str) -> None:
    import mlflow

    with_retries(lambda: mlflow.log_dict(data, name))
