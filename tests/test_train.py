"""The train stage: outputs, MLflow run, determinism and failure modes."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pneumo.config import parse_params
from pneumo.core.data import CachedSplit, CacheLoader
from pneumo.core.inference import load_network
from pneumo.core.loop import (
    Precision,
    TrainingDivergedError,
    fit,
    precise_bn_rows,
    recompute_batchnorm_statistics,
    train_one_epoch,
)
from pneumo.core.losses import FocalLoss
from pneumo.core.models import build_model
from pneumo.mlops import tracking
from tests.conftest import TINY_PARAMS, run_cli, store_uri


def test_outputs_of_the_train_stage(tiny_project):
    model_dir = tiny_project / "checkpoints/resnet50"
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["backbone"] == "resnet50" and meta["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert meta["image_size"] == 32 and meta["normalisation"]["mean"] == [0.5, 0.5, 0.5]
    assert 1 <= meta["best_epoch"] <= 2 and meta["params"]["loss"]["name"] == "focal"
    assert meta["platform"]["kernels"] == "native" and meta["platform"]["threads"] >= 1
    state = torch.load(model_dir / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    model, _ = load_network(model_dir)
    assert not model.training
    history = pd.read_csv(tiny_project / "reports/history/resnet50.csv")
    assert list(history.epoch) == [1, 2]
    metrics = json.loads((tiny_project / "reports/train/resnet50/metrics.json").read_text())
    assert metrics["best_val_loss"] == pytest.approx(history.val_loss.min())
    assert (model_dir / "curves.png").stat().st_size > 1000


def test_the_training_run_is_in_mlflow(tiny_project, monkeypatch):
    meta = json.loads((tiny_project / "checkpoints/resnet50/meta.json").read_text())
    assert "mlflow_run_id" not in meta  # the folder holds facts about the model only
    monkeypatch.chdir(tiny_project)  # the run index lies in the repository root
    run_id = tracking.training_run_of(tiny_project / "checkpoints/resnet50/model.pt")
    mlflow.set_tracking_uri(store_uri(tiny_project))
    run = mlflow.get_run(run_id)
    assert run.info.run_name == "workspace-resnet50"
    assert run.data.tags["dvc_experiment"] == "workspace"
    assert run.data.tags["dvc_stage"] == "train@resnet50"
    assert run.data.tags["data_hash"] == meta["data_hash"]
    assert "git_commit" in run.data.tags and "git_dirty" in run.data.tags
    assert run.data.params["loss.gamma"] == "1.5" and run.data.params["backbone"] == "resnet50"
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert "test_roc_auc" in run.data.metrics  # added by evaluate, same run
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"model.pt", "meta.json", "curves.png", "params.json", "evaluation"} <= artifacts


def _tiny_params(**train):
    raw = json.loads(json.dumps(TINY_PARAMS))
    raw["train"] |= train
    return parse_params(raw)


def test_two_cpu_runs_with_the_same_params_are_identical(tiny_project):
    """Also when loader threads read the batches ahead instead of the main thread."""
    cache, cpu = tiny_project / "data/processed", torch.device("cpu")
    first = fit(_tiny_params(epochs=1, num_workers=0), "efficientnet-b0", cache, cpu)
    second = fit(_tiny_params(epochs=1, num_workers=2), "efficientnet-b0", cache, cpu)
    keys = ("train_loss", "val_loss", "val_auc")
    assert [{k: h[k] for k in keys} for h in first.history] == [
        {k: h[k] for k in keys} for h in second.history
    ]
    second_state = second.model.state_dict()
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second_state[key]), key


def test_nan_loss_stops_training_with_a_clear_error(tiny_project):
    split = CachedSplit.load(tiny_project / "data/processed", "train")
    loader = CacheLoader(split, batch_size=8)
    model = build_model("resnet50")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def nan_loss(logits, targets):
        return logits.sum() * float("nan")

    with pytest.raises(TrainingDivergedError, match="lower train.lr"):
        train_one_epoch(model, loader, nan_loss, optimizer, torch.device("cpu"))


def test_mixed_precision_and_channels_last_path_runs_on_cpu(tiny_project):
    """The CUDA settings, exercised with CPU autocast (bfloat16) and channels_last."""
    split = CachedSplit.load(tiny_project / "data/processed", "train")
    loader = CacheLoader(split, batch_size=16)
    model = build_model("resnet50").to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    precision = Precision(amp_dtype=torch.bfloat16, channels_last=True)
    stats = train_one_epoch(model, loader, FocalLoss(), optimizer, torch.device("cpu"), precision)
    assert stats["train_loss"] > 0 and stats["images_per_second"] > 0
    assert precision.to_input(torch.zeros(2, 1, 4, 4), torch.device("cpu")).is_contiguous(
        memory_format=torch.channels_last
    )


def test_cpu_runs_in_full_precision_and_cuda_in_the_chosen_one():
    cpu = Precision.for_device(torch.device("cpu"), _tiny_params().train)
    assert cpu == Precision(amp_dtype=None, channels_last=False)
    for amp, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("off", None)):
        cuda = Precision.for_device(torch.device("cuda"), _tiny_params(amp=amp).train)
        assert cuda == Precision(amp_dtype=dtype, channels_last=True)
        scaled = isinstance(cuda.grad_scaler(), torch.amp.GradScaler)
        assert (cuda.amp_dtype == torch.float16) == scaled


def test_interrupted_training_leaves_the_previous_checkpoint_untouched(project_copy, monkeypatch):
    before = {
        p: p.read_bytes() for p in sorted((project_copy / "checkpoints").rglob("*")) if p.is_file()
    }

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pneumo.stages.train._curves_png", interrupted)
    result = run_cli("train", "resnet50")
    assert result.exit_code != 0
    after = {
        p: p.read_bytes() for p in sorted((project_copy / "checkpoints").rglob("*")) if p.is_file()
    }
    assert after == before  # no new checkpoint, no staging folder left behind


def test_invalid_params_fail_before_any_data_is_read(in_tmp):
    result = run_cli("train", "resnet50", params={"train": {"lr": 0}, "loss": {"gamma": -1}})
    assert result.exit_code == 1
    assert "train.lr" in result.output and "loss.gamma" in result.output


def test_an_unknown_backbone_is_refused_with_the_known_names(in_tmp):
    result = run_cli("train", "resnet18", params={})
    assert result.exit_code == 1 and "unknown backbone 'resnet18'" in result.output
    assert "densenet121" in result.output


def test_precise_batchnorm_recomputes_statistics_from_the_current_weights():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.norm = torch.nn.BatchNorm2d(4)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.drop(self.norm(self.conv(pixels.float())))

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8)
    split = CachedSplit(images=images, targets=np.zeros(12, np.int64), manifest=pd.DataFrame())
    net = Net()
    net.norm.running_mean.fill_(5.0)  # stale statistics from earlier weights
    rows = precise_bn_rows(split.targets, 100)
    assert rows == list(range(12))
    random_state = torch.get_rng_state()
    recompute_batchnorm_statistics(
        net, CacheLoader(split, batch_size=12, indices=rows), torch.device("cpu")
    )
    features = net.conv(torch.from_numpy(images).unsqueeze(1).float()).detach()
    assert torch.allclose(net.norm.running_mean, features.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(net.norm.running_var, features.var((0, 2, 3)), rtol=1e-3)
    assert net.norm.momentum == 0.1 and not net.training  # as it was, in eval mode
    assert torch.equal(torch.get_rng_state(), random_state)  # dropout stayed off
    assert precise_bn_rows(np.zeros(10), 4) == [0, 3, 6, 9]  # spread over the split
