"""Which tracking store the project uses, and a repository that was copied or moved."""

from __future__ import annotations

import shutil
import sqlite3
from io import StringIO
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pneumo.config import TrackingConfig
from pneumo.mlops import store, tracking
from pneumo.mlops.predict import COLUMNS
from tests.conftest import run_cli, store_uri

NAME = "pneumo-classifier"


def test_the_environment_wins_over_params_which_win_over_the_embedded_store(in_tmp, monkeypatch):
    (in_tmp / "dvc.yaml").write_text("stages: {}\n")
    embedded = store_uri(in_tmp)
    assert store.tracking_uri(TrackingConfig()) == embedded
    assert store.store_label(TrackingConfig()) == "embedded"
    configured = TrackingConfig(uri="http://tracking.example:5000")
    assert store.tracking_uri(configured) == "http://tracking.example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    assert store.tracking_uri(configured) == "http://team:5000"
    assert store.tracking_uri(TrackingConfig()) == "http://team:5000"


def test_a_password_never_reaches_a_record(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://ml:s3cret@db:5432/mlflow")
    assert store.store_label(TrackingConfig()) == "postgresql://ml:***@db:5432/mlflow"


def test_another_store_gets_no_artifact_location_from_the_project(in_tmp):
    """Only the embedded store keeps artifacts in the repository's mlartifacts; any other
    store (a tracking server above all) decides where its artifacts go."""
    (in_tmp / "dvc.yaml").write_text("stages: {}\n")
    other = in_tmp / "elsewhere"
    other.mkdir()
    config = TrackingConfig(uri=f"sqlite:///{other / 'team.db'}", experiment="tests")
    experiment_id = store.configure(config)
    location = mlflow.get_experiment(experiment_id).artifact_location
    assert store.ARTIFACTS_DIR not in location
    assert not (in_tmp / "mlflow.db").exists()


def _log_one_run(root: Path) -> mlflow.entities.Run:
    with tracking.start_run(
        TrackingConfig(experiment="tests"), run_name="r", tags={"dvc_stage": "test"}
    ) as run:
        tracking.log_artifacts([root / "dvc.yaml"])
    return MlflowClient().get_run(run.info.run_id)


def test_mlflow_is_configured_once_per_process_and_store(in_tmp, monkeypatch):
    (in_tmp / "dvc.yaml").write_text("stages: {}\n")
    relocations = []
    relocate = store.relocate_store
    monkeypatch.setattr(store, "relocate_store", lambda *a: relocations.append(a) or relocate(*a))
    config = TrackingConfig(experiment="once")
    first = store.configure(config)
    assert store.configure(config) == first and len(relocations) == 1
    other = TrackingConfig(experiment="other")
    assert store.configure(other) != first  # another experiment is looked up
    mlflow.set_tracking_uri(f"sqlite:///{in_tmp / 'elsewhere.db'}")  # someone pointed away
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # which MLflow exports; pneumo would read it
    assert store.configure(config) == first and len(relocations) == 3


def test_a_copied_store_points_at_its_own_folder_once(tmp_path, monkeypatch):
    first = tmp_path / "first"
    first.mkdir()
    (first / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(first)
    old_run = _log_one_run(first)
    assert old_run.info.artifact_uri.startswith((first / "mlartifacts").as_uri() + "/")
    # A neighbour whose name extends ours must not be rewritten with it.
    with sqlite3.connect(first / "mlflow.db") as db:
        db.execute(
            "UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?",
            ((first / "mlartifacts").as_uri() + "-other/x", old_run.info.run_id),
        )
    second = tmp_path / "second"
    shutil.copytree(first, second)
    monkeypatch.chdir(second)
    artifacts = (second / "mlartifacts").as_uri()
    assert store.relocate_store(second / "mlflow.db", artifacts) == 1  # the experiment
    assert store.relocate_store(second / "mlflow.db", artifacts) == 0
    run = _log_one_run(second)
    assert run.info.artifact_uri.startswith(artifacts + "/")
    assert MlflowClient().get_run(old_run.info.run_id).info.artifact_uri.endswith("-other/x")
    assert (second / "mlartifacts" / run.info.run_id).is_dir()
    assert not (first / "mlartifacts" / run.info.run_id).exists()


@pytest.mark.slow
def test_a_moved_project_loads_its_registered_models_and_logs_in_its_own_folder(
    project_copy, tmp_path, monkeypatch
):
    for command in ("compare", "register"):
        assert run_cli(command).exit_code == 0
    copy = tmp_path / "copy"
    shutil.copytree(project_copy, copy)
    moved = tmp_path / "moved"
    shutil.move(project_copy, moved)  # the original folder is gone

    monkeypatch.chdir(moved)
    result = run_cli("predict", "--model", f"models:/{NAME}@challenger", *_images(moved))
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.strip().splitlines()
    predicted = pd.read_csv(StringIO(result.stdout))
    assert header == ",".join(COLUMNS) and len(rows) == 2
    assert predicted.error.isna().all() and predicted.probability.between(0, 1).all()
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("tests").experiment_id])
    assert all(r.info.artifact_uri.startswith((moved / "mlartifacts").as_uri()) for r in runs)

    before = sorted((moved / "mlartifacts").rglob("*"))
    monkeypatch.chdir(copy)  # the copy logs beside itself; the original's files stay as they were
    assert run_cli("train", "efficientnet-b0").exit_code == 0
    assert sorted((moved / "mlartifacts").rglob("*")) == before
    run_id = tracking.training_run_of(copy / "checkpoints/efficientnet-b0/model.pt")
    assert (
        MlflowClient().get_run(run_id).info.artifact_uri.startswith((copy / "mlartifacts").as_uri())
    )


def _images(root: Path) -> list[str]:
    return [str(p) for p in sorted((root / "data/raw/test/PNEUMONIA").iterdir())[:2]]
