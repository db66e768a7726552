"""scripts/team-server: an MLflow server on PostgreSQL that stores the artifacts it receives."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.team_stack import SCRIPT, TeamServer, team_server  # noqa: F401 (fixture)


def test_usage_without_arguments():
    result = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "team-server start DIR [--port N] [--pg-port N]" in result.stderr
    assert "team-server stop DIR" in result.stderr


@pytest.mark.slow
def test_runs_go_to_postgresql_and_artifacts_to_the_server(
    team_server: TeamServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.uri)
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("team-stack")  # no artifact_location: the server's
    run_id = client.create_run(experiment_id).info.run_id
    note = tmp_path / "note.txt"
    note.write_text("logged through the server\n")
    client.log_artifact(run_id, str(note))
    client.log_metric(run_id, "val_auc", 0.875, step=2)
    client.set_terminated(run_id)

    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    stored = list(team_server.artifacts.rglob("note.txt"))
    assert len(stored) == 1 and run_id in stored[0].parts
    assert stored[0].read_text() == "logged through the server\n"
    fetched = client.download_artifacts(run_id, "note.txt", str(tmp_path / "fetched"))
    assert Path(fetched).read_text() == "logged through the server\n"

    assert team_server.sql("select run_uuid, status from runs") == [(run_id, "FINISHED")]
    assert team_server.sql(
        "select key, value, step from metrics where run_uuid = :run_id", run_id=run_id
    ) == [("val_auc", 0.875, 2)]
    assert team_server.sql(
        "select name from experiments where experiment_id = :id", id=int(experiment_id)
    ) == [("team-stack",)]
