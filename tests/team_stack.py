"""The team stack of scripts/team-server (MLflow server on PostgreSQL) as a pytest fixture.

A test module uses it with ``from tests.team_stack import team_server`` (or
``pytest_plugins = ["tests.team_stack"]``). One stack serves the whole module: tests name their
own experiments. The stack runs in a temporary folder on free ports and is stopped and removed
afterwards, also when a test fails. Without PostgreSQL's server binaries the tests fail (CI must
run them; ``.ci/run`` installs Debian's ``postgresql``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "team-server"


@dataclass(frozen=True)
class TeamServer:
    uri: str  # the tracking URI, for MLFLOW_TRACKING_URI
    root: Path  # the stack's folder (DIR of scripts/team-server)
    pg_port: int

    @property
    def artifacts(self) -> Path:
        """Where the server keeps the artifacts it receives."""
        return self.root / "artifacts"

    @property
    def backend_store_uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/mlflow"

    @property
    def optuna_storage(self) -> str:
        """The database scripts/team-server creates for `pneumo tune --storage`."""
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/optuna"

    def sql(self, query: str, **params: Any) -> list[tuple]:
        """Rows of a query on the server's PostgreSQL database."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.backend_store_uri)
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(sqlalchemy.text(query), params)]
        finally:
            engine.dispose()


def _missing() -> str | None:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return "no PostgreSQL server (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql"
    if importlib.util.find_spec("psycopg") is None:
        return "no PostgreSQL driver psycopg: pip install -e '.[dev]'"
    return None


@pytest.fixture(scope="module")
def team_server() -> Iterator[TeamServer]:
    if reason := _missing():
        pytest.fail(f"the team stack cannot start: {reason}", pytrace=False)
    # Not pytest's tmp_path: its /tmp/pytest-of-<user> is private, and as root PostgreSQL runs
    # as the user postgres, which must reach the cluster's folder.
    root = Path(tempfile.mkdtemp(prefix="pneumo-team-"))
    root.chmod(0o711)
    port, pg_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_WORKERS": "1",  # 2 shared cores; the default 4 only slows the start
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # GenAI job runners: 8 more processes
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        started = subprocess.run(
            [str(SCRIPT), "start", str(root), "--port", str(port), "--pg-port", str(pg_port)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        if started.returncode != 0:
            pytest.fail(f"scripts/team-server start failed:\n{started.stderr}", pytrace=False)
        yield TeamServer(uri=started.stdout.strip(), root=root, pg_port=pg_port)
    finally:
        subprocess.run([str(SCRIPT), "stop", str(root)], env=env, timeout=120, check=False)
        shutil.rmtree(root, ignore_errors=True)
