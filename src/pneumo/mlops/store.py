"""Where MLflow runs go: the tracking store and experiment, configured once per process.

Where runs go: ``MLFLOW_TRACKING_URI`` when set, else ``tracking.uri`` of params.yaml, else the
embedded store, ``sqlite:///<repo root>/mlflow.db`` with artifacts in ``<repo root>/mlartifacts``.
With a tracking server the project sets no artifact location: artifacts go where the server
says (``mlflow-artifacts:/…`` with ``mlflow server --artifacts-destination``). No stage takes
the store as an input, so pointing the project at a server reruns nothing.

The root is ``DVC_ROOT`` when DVC sets it, else the nearest folder above the working directory
holding dvc.yaml. Queued and ``--temp`` experiments run in copies under
``<repo>/.dvc/tmp/exps/``; those resolve to the repository that owns the copy, so every
execution logs to one database.

MLflow's SQL store records artifact locations as absolute ``file://`` URIs. A repository that
was copied or moved would keep logging into, and loading from, the folder where it was first
run, so :func:`configure` rewrites those paths to the repository's own ``mlartifacts`` when it
finds them elsewhere (:func:`relocate_store`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from pneumo.config import TrackingConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


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


def embedded_uri(root: Path) -> str:
    return f"sqlite:///{root / DB_FILE}"


def tracking_uri(config: TrackingConfig, root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` > ``tracking.uri`` > the embedded store of the repository."""
    return os.environ.get("MLFLOW_TRACKING_URI") or config.uri or embedded_uri(root or repo_root())


def store_label(config: TrackingConfig) -> str:
    """The store for people and records: ``embedded`` for the repository's own (its path
    differs in every clone), else the URI without a password."""
    uri = tracking_uri(config)
    if uri == embedded_uri(repo_root()):
        return "embedded"
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


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


# The store and experiment this process configured last: (tracking URI, name) → experiment id.
_configured: dict[tuple[str, str], str] = {}


def configure(config: TrackingConfig) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id.

    Once per process and store: a second call finds MLflow still pointed there and returns
    at once (relocating the embedded store takes SQLite's write lock, and the experiment
    lookup is a query), so stages and helpers may call it wherever they need MLflow.
    """
    import mlflow

    root = repo_root()
    uri = tracking_uri(config, root)
    key = (uri, config.experiment)
    if key in _configured and mlflow.get_tracking_uri() == uri:
        return _configured[key]
    _configured.clear()
    embedded = uri == embedded_uri(root)
    artifacts = (root / ARTIFACTS_DIR).resolve().as_uri() if embedded else None
    if artifacts is not None:
        relocate_store(root / DB_FILE, artifacts)
    _set_tracking_uri(uri)
    experiment = with_retries(lambda: mlflow.get_experiment_by_name(config.experiment))
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        try:
            experiment_id = with_retries(
                lambda: mlflow.create_experiment(config.experiment, artifact_location=artifacts)
            )
        except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel run
            experiment_id = mlflow.get_experiment_by_name(config.experiment).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    _configured[key] = experiment_id
    return experiment_id


def _set_tracking_uri(uri: str) -> None:
    """``mlflow.set_tracking_uri``, leaving ``MLFLOW_TRACKING_URI`` as it was.

    MLflow exports the URI to the environment for child processes. Left there, the embedded
    store of one repository would read as the user's choice (:func:`tracking_uri` puts the
    variable first) in this process after a move, and in any child process in another clone.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# Every column of MLflow's SQL schema that holds an artifact location (tables and columns
# missing from an older schema are skipped).
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def relocate_store(db: Path, artifacts: str) -> int:
    """Point the embedded store's artifact paths at ``artifacts`` (the ``file://`` URI of this
    repository's ``mlartifacts``) when they name another folder's; returns the rows changed.

    A copied or moved repository brings its ``mlflow.db`` and ``mlartifacts`` along, but the
    database still names the old folder. Only locations ending in ``/mlartifacts``, the ones
    :func:`configure` creates, are moved. One transaction: parallel stages wait for it, and a
    kill leaves the old paths, rewritten on the next run.
    """
    if not db.is_file():
        return 0
    suffix = f"/{ARTIFACTS_DIR}"
    connection = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        tables = {
            table: {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
            for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if "artifact_location" not in tables.get("experiments", ()):
            connection.execute("ROLLBACK")
            return 0
        old_roots = {
            location
            for (location,) in connection.execute("SELECT artifact_location FROM experiments")
            if location and location.endswith(suffix) and location != artifacts
        }
        changed = 0
        for old in old_roots:
            for table, column in LOCATION_COLUMNS:
                if column not in tables.get(table, ()):
                    continue
                changed += connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (artifacts, len(old) + 1, old, len(old) + 1, old + "/"),
                ).rowcount
            log.warning(
                "the repository moved: the tracking store's artifacts were at %s, now %s "
                "(paths rewritten)", old, artifacts,
            )  # fmt: skip
        connection.execute("COMMIT")
        return changed
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    finally:
        connection.close()
