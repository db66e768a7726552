"""The MLflow UI's server, started on the project's database, serves the runs over REST."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pneumo.mlops import tracking
from tests.conftest import free_port, store_uri

pytestmark = [pytest.mark.slow, pytest.mark.scenario]


def _call(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture
def server(tiny_project: Path):
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    process = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri",
         store_uri(tiny_project), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_runs_params_and_metrics_are_served(server, tiny_project, monkeypatch):
    experiment = _call(server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=tests")
    experiment_id = experiment["experiment"]["experiment_id"]
    found = _call(
        server,
        "/api/2.0/mlflow/runs/search",
        {"experiment_ids": [experiment_id], "filter": "tags.dvc_experiment = 'workspace'"},
    )
    runs = {r["info"]["run_name"]: r for r in found["runs"]}
    assert set(runs) == {"workspace-resnet50", "workspace-efficientnet-b0"}
    resnet = runs["workspace-resnet50"]
    params = {p["key"]: p["value"] for p in resnet["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in resnet["data"]["metrics"]}
    monkeypatch.chdir(tiny_project)  # the run index lies in the repository root
    run_id = tracking.training_run_of(tiny_project / "checkpoints/resnet50/model.pt")
    assert resnet["info"]["run_id"] == run_id
    assert params["backbone"] == "resnet50" and params["train.epochs"] == "2"
    assert {"val_loss", "val_auc", "test_roc_auc", "threshold"} <= set(metrics)
    history = _call(
        server,
        f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=val_loss",
    )
    assert [m["step"] for m in history["metrics"]] == [1, 2]
