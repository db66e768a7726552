"""scripts/team-server: an MLflow server on PostgreSQL that stores the artifacts it receives."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import (
    BATCH_TOLERANCE,
    TINY_SEARCH,
    pneumo_process,
    preprocessed_copy,
    run_tool,
    tiny_repository,
    tool_env,
)
from tests.team_stack import SCRIPT, TeamServer, team_server  # noqa: F401 (fixture)

NAME = "pneumo-classifier"


def _on_server(server: TeamServer, uri: str) -> Path:
    """The folder of an ``mlflow-artifacts:/…`` URI in the server's artifact store."""
    assert uri.startswith("mlflow-artifacts:/"), uri
    return server.artifacts / uri.removeprefix("mlflow-artifacts:/").lstrip("/")


def test_usage_without_arguments():
    result = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "team-server start DIR [--port N] [--pg-port N]" in result.stderr
    assert "team-server stop DIR" in result.stderr


@pytest.mark.slow
@pytest.mark.scenario
def test_runs_go_to_postgresql_and_artifacts_to_the_server(
    team_server: TeamServer,  # noqa: F811
    tmp_path: Path,
):
    import mlflow

    # Explicit URIs: MLflow prefers a URI set earlier in this process to the environment.
    client = mlflow.MlflowClient(tracking_uri=team_server.uri, registry_uri=team_server.uri)
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


@pytest.mark.slow
@pytest.mark.scenario
def test_a_team_runs_the_pipeline_on_the_server_and_a_second_clone_serves_its_champion(
    team_server: TeamServer,  # noqa: F811
    tmp_path: Path,
):
    """One clone runs `dvc repro` against the server; nothing is tracked locally. A fresh clone
    with no data, no DVC outputs and no store predicts with the champion it promoted."""
    from mlflow import MlflowClient

    env = tool_env(MLFLOW_TRACKING_URI=team_server.uri)
    first = tiny_repository(tmp_path / "first")
    started = time.perf_counter()
    run_tool("dvc", "repro", cwd=first, env=env)
    print(f"dvc repro against the team server: {time.perf_counter() - started:.1f} s")
    assert not (first / "mlflow.db").exists() and not (first / "mlartifacts").exists()

    client = MlflowClient(tracking_uri=team_server.uri, registry_uri=team_server.uri)
    experiment = client.get_experiment_by_name("tests")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.data.tags["dvc_stage"] for r in runs] == ["train@resnet50"]
    for run in runs:
        assert run.info.status == "FINISHED"
        stored = _on_server(team_server, run.info.artifact_uri)
        assert (stored / "model.pt").stat().st_size > 0
        assert (stored / "evaluation" / "metrics.json").is_file()  # logged by evaluate
    record = json.loads((first / "reports/registry.json").read_text())
    assert record["store"] == team_server.uri
    for backbone, version in record["versions"].items():
        source = client.get_model_version_download_uri(NAME, version)
        assert (_on_server(team_server, source) / "MLmodel").is_file(), backbone
    assert team_server.sql("select count(*) from model_versions") == [(1,)]

    # Registering into another store rewrites the record; back on the server, `dvc repro`
    # registers again (reusing the versions) instead of restoring a record from DVC's cache.
    run_tool("pneumo", "register", cwd=first, env=tool_env())
    assert json.loads((first / "reports/registry.json").read_text())["store"] == "embedded"
    assert "register" in run_tool("dvc", "status", cwd=first, env=env)
    again = run_tool("dvc", "repro", cwd=first, env=env)
    assert "Running stage 'register'" in again and "is cached" not in again
    rerecorded = json.loads((first / "reports/registry.json").read_text())
    assert (rerecorded["store"], rerecorded["versions"]) == (team_server.uri, record["versions"])
    assert team_server.sql("select count(*) from model_versions") == [(1,)]

    run_tool("pneumo", "promote", "--force", cwd=first, env=env)  # tiny models: below the floor
    champion = client.get_model_version_by_alias(NAME, "champion")
    backbone = champion.tags["backbone"]
    expected = pd.read_csv(first / f"reports/eval/{backbone}/predictions.csv").iloc[0]
    image = first / "data/raw" / expected["image"]

    second = tmp_path / "second"
    run_tool("git", "clone", "-q", str(first), str(second), cwd=tmp_path, env=env)
    output = run_tool(
        "pneumo", "predict", "--model", f"models:/{NAME}@champion", "--output", "json",
        str(image), cwd=second, env=env,
    )  # fmt: skip
    [row], _ = json.JSONDecoder().raw_decode(output, output.index("["))  # stdout, then stderr
    assert row["probability"] == pytest.approx(expected["probability"], abs=BATCH_TOLERANCE)
    assert not (second / "mlflow.db").exists() and not (second / "data").exists()


@pytest.mark.slow
@pytest.mark.scenario
def test_two_tune_workers_share_one_study_on_postgresql_and_log_to_the_server(
    team_server: TeamServer,  # noqa: F811
    tiny_project: Path,
    tmp_path: Path,
):
    """Two `pneumo tune` processes, one study in the team's PostgreSQL: they split the budget
    (no trial number twice, no trial over it) and every trial is a run on the MLflow server."""
    import optuna
    from mlflow import MlflowClient

    project = preprocessed_copy(tiny_project, tmp_path / "p", tracking={"experiment": "tune"})
    (project / "search.yaml").write_text(yaml.safe_dump(TINY_SEARCH))
    command = ("tune", "search.yaml", "--trials", "6", "--storage", team_server.optuna_storage,
               "--study", "shared")  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": team_server.uri}
    workers = [pneumo_process(*command, cwd=project, env=env) for _ in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs

    trials = optuna.load_study(study_name="shared", storage=team_server.optuna_storage).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    pids = {t.user_attrs["pneumo.worker"]["pneumo.pid"] for t in trials}
    assert pids == {str(worker.pid) for worker in workers}  # both took trials

    client = MlflowClient(tracking_uri=team_server.uri)
    experiment = client.get_experiment_by_name("tune")
    runs = client.search_runs([experiment.experiment_id], "tags.`optuna.study` = 'shared'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r not in parents]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == list(range(6))
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in children)
    assert (project / "reports/tune/shared/history.png").is_file()
