"""torchrun: several processes train one model and only the main one writes."""

from __future__ import annotations

import json

import pytest

from tests.conftest import (
    pneumo_process,
    tracked_runs,
    write_params,
)


@pytest.mark.slow
@pytest.mark.scenario
def test_torchrun_with_two_cpu_processes_trains_and_writes_once(tiny_project, tmp_path):
    import shutil

    results = {}
    for nproc in (1, 2):
        project = tmp_path / f"nproc{nproc}"
        shutil.copytree(tiny_project, project)
        shutil.rmtree(project / "checkpoints")
        (project / "mlflow.db").unlink()
        write_params(project, epochs=3, patience=3, nproc=nproc, device="cpu")
        done = pneumo_process("train", "resnet50", cwd=project)
        output = done.communicate(timeout=900)[0]
        assert done.returncode == 0, output
        assert [p.name for p in (project / "checkpoints").iterdir()] == ["resnet50"]
        assert list((project / "checkpoints/resnet50").glob("*.pt")) == [
            project / "checkpoints/resnet50/model.pt"
        ]
        [run] = tracked_runs(project)
        assert run.data.params["world_size"] == str(nproc)
        results[nproc] = json.loads((project / "reports/train/resnet50/metrics.json").read_text())
    # Same global batch, same draws: only BatchNorm sees per-process halves of each batch.
    assert results[2]["epochs_run"] == results[1]["epochs_run"]
    assert abs(results[2]["best_val_auc"] - results[1]["best_val_auc"]) < 0.2, results
