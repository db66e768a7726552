"""Stage `train@<backbone>`: fit one backbone on the cache, keep the best epoch by val loss.

Reading order: ``train_one_epoch`` → ``evaluate`` → ``fit`` → ``train`` (the stage: tracking
and outputs). Outputs are staged in a temporary folder and moved into place at the very end,
so an interrupted run never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from pneumo import tracking
from pneumo.config import CLASS_NAMES, Params, TrainConfig, flatten
from pneumo.data import (
    ArrayDataset,
    CachedSplit,
    balanced_sampler,
    cache_fingerprint,
    make_loader,
    train_transform,
)
from pneumo.errors import UserError
from pneumo.files import staged_dir, write_json_atomic, write_text_atomic
from pneumo.losses import build_loss
from pneumo.models import build_model, normalisation

log = logging.getLogger(__name__)

CHECKPOINT = "model.pt"
META = "meta.json"
CURVES_PNG = "curves.png"


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite."""


def set_seed(seed: int) -> None:
    """Seed every generator and ask for deterministic kernels (CPU runs repeat exactly)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is visible; use auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


@dataclass(frozen=True)
class Precision:
    """How batches run on the device: autocast dtype (None = fp32) and memory format."""

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def for_device(cls, device: torch.device, config: TrainConfig) -> Precision:
        if device.type != "cuda":
            return cls()
        return cls(torch.float16 if config.amp else None, config.channels_last)

    def to_input(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        pixels = pixels.to(device, non_blocking=True)
        return (
            pixels.contiguous(memory_format=torch.channels_last) if self.channels_last else pixels
        )

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(
            device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: Precision = Precision(),
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    model.train()
    total, seen, start = 0.0, 0, time.perf_counter()
    # disable=None: a progress bar on terminals, silence in CI logs and DVC queue logs.
    for pixels, targets in tqdm(loader, desc="train", unit="batch", leave=False, disable=None):
        pixels, targets = precision.to_input(pixels, device), targets.to(device)
        with precision.autocast(device):
            loss = loss_fn(model(pixels).float(), targets)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"training loss became {loss.item()} after {seen} images: lower train.lr"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += loss.item() * len(targets)
        seen += len(targets)
    elapsed = time.perf_counter() - start
    return {"train_loss": total / seen, "images_per_second": seen / elapsed}


@torch.inference_mode()
def predict_proba(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    precision: Precision = Precision(),
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets of a whole loader, in loader order."""
    model.eval()
    logits, targets = [], []
    for pixels, target in loader:
        with precision.autocast(device):
            logits.append(model(precision.to_input(pixels, device)).float().cpu())
        targets.append(target)
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    loss_fn: nn.Module,
    device: torch.device,
    precision: Precision = Precision(),
) -> dict[str, float]:
    logits, targets = predict_proba(model, loader, device, precision)
    loss = loss_fn(torch.from_numpy(logits), torch.from_numpy(targets)).item()
    auc = roc_auc_score(targets, logits) if len(set(targets)) == 2 else float("nan")
    return {"val_loss": loss, "val_auc": float(auc)}


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
    return None


@dataclass
class FitResult:
    model: nn.Module
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def best(self) -> dict[str, float]:
        return self.history[self.best_epoch - 1]


def fit(params: Params, backbone: str, cache_dir: Path, device: torch.device) -> FitResult:
    """Train with early stopping on validation loss; returns the model at its best epoch."""
    cfg = params.train
    set_seed(params.seed)
    train_split = CachedSplit.load(cache_dir, "train")
    val_split = CachedSplit.load(cache_dir, "val")
    size = train_split.images.shape[-1]
    pin = device.type == "cuda"
    sampler = balanced_sampler(train_split.targets, params.seed) if cfg.weighted_sampler else None
    train_loader = make_loader(
        ArrayDataset(train_split, train_transform(params.augment, size=size)),
        batch_size=cfg.batch_size, shuffle=True, sampler=sampler, seed=params.seed,
        num_workers=cfg.num_workers, pin_memory=pin,
    )  # fmt: skip
    val_loader = make_loader(
        ArrayDataset(val_split), batch_size=params.evaluate.batch_size,
        num_workers=cfg.num_workers, pin_memory=pin,
    )  # fmt: skip

    model = build_model(
        backbone,
        pretrained=params.model.pretrained,
        dropout=params.model.dropout,
        hidden_size=params.model.hidden_size,
    )
    precision = Precision.for_device(device, cfg)
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(params.loss, *train_split.class_counts()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda") if precision.amp_dtype == torch.float16 else None

    result = FitResult(model=model, best_epoch=0)
    best_state, best_loss, stale = None, math.inf, 0
    for epoch in range(1, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(model, train_loader, loss_fn, optimizer, device, precision, scaler)
        stats |= evaluate(model, val_loader, loss_fn, device, precision)
        stats |= {"epoch": epoch, "lr": lr}
        result.history.append(stats)
        log.info(
            "%s epoch %d/%d train_loss %.4f val_loss %.4f val_auc %.4f (%.0f img/s)",
            backbone, epoch, cfg.epochs, stats["train_loss"], stats["val_loss"],
            stats["val_auc"], stats["images_per_second"],
        )  # fmt: skip
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(stats["val_loss"])
        elif scheduler is not None:
            scheduler.step()
        if stats["val_loss"] < best_loss:
            best_loss, stale, result.best_epoch = stats["val_loss"], 0, epoch
            best_state = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
        else:
            stale += 1
            if stale >= cfg.patience:
                log.info("early stop: val loss has not improved for %d epochs", stale)
                break
    model.load_state_dict(best_state)
    return result


def _curves_png(history: pd.DataFrame, backbone: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(history.epoch, history.train_loss, "o-", label="train")
    left.plot(history.epoch, history.val_loss, "o-", label="validation")
    left.set(xlabel="epoch", ylabel="loss", title=f"{backbone}: loss")
    left.legend()
    right.plot(history.epoch, history.val_auc, "o-", color="C2")
    right.set(xlabel="epoch", ylabel="ROC AUC", title="validation AUC", ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    params: Params,
    backbone: str,
    cache_dir: Path,
    model_dir: Path,
    report_dir: Path,
    history_file: Path,
) -> dict[str, float]:
    """The stage: fit, log the run to MLflow, write checkpoint, meta, metrics and history."""
    device = resolve_device(params.train.device)
    data_hash = cache_fingerprint(cache_dir)
    run_name = f"{tracking.experiment_name()}-{backbone}"
    tags = tracking.context_tags(f"train@{backbone}", data_hash) | {"backbone": backbone}
    with tracking.start_run(params.tracking, run_name=run_name, tags=tags) as run:
        tracking.log_params(flatten(params) | {"backbone": backbone, "device": str(device)})
        started = time.perf_counter()
        result = fit(params, backbone, cache_dir, device)
        seconds = time.perf_counter() - started
        for stats in result.history:
            tracking.log_metrics(
                {k: v for k, v in stats.items() if k != "epoch"}, step=int(stats["epoch"])
            )
        history = pd.DataFrame(result.history)[
            ["epoch", "train_loss", "val_loss", "val_auc", "lr", "images_per_second"]
        ]
        metrics = {
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "best_val_loss": result.best["val_loss"],
            "best_val_auc": result.best["val_auc"],
            "train_seconds": round(seconds, 2),
            "images_per_second": float(history.images_per_second.mean()),
        }
        meta = {
            "backbone": backbone,
            "class_names": list(CLASS_NAMES),
            "image_size": params.data.image_size,
            "resize": params.data.resize,
            "normalisation": normalisation(params.model.pretrained),
            "best_epoch": result.best_epoch,
            "mlflow_run_id": run.info.run_id,
            "mlflow_tracking_uri": tracking.tracking_uri(params.tracking),
            "dvc_experiment": tracking.experiment_name(),
            "data_hash": data_hash,
            "params": params.model_dump(mode="json"),
        }

        with staged_dir(model_dir) as staging:
            torch.save(result.model.cpu().state_dict(), staging / CHECKPOINT)
            write_json_atomic(staging / META, meta)
            _curves_png(history, backbone, staging / CURVES_PNG)
            tracking.log_metrics({f"best_{k}": v for k, v in result.best.items() if k != "epoch"})
            tracking.log_artifacts([staging / CHECKPOINT, staging / META, staging / CURVES_PNG])
            tracking.log_dict(params.model_dump(mode="json"), "params.json")
    write_text_atomic(history_file, history.to_csv(index=False))
    write_json_atomic(report_dir / "metrics.json", metrics)
    log.info(
        "%s: best epoch %d, val AUC %.4f", backbone, result.best_epoch, metrics["best_val_auc"]
    )
    return metrics


def load_checkpoint(model_dir: Path) -> tuple[nn.Module, dict]:
    """The trained model (eval mode, CPU) and its meta.json."""
    meta = json.loads((model_dir / META).read_text())
    model_params = meta["params"]["model"]
    model = build_model(
        meta["backbone"],
        pretrained=False,  # the checkpoint holds all weights; never download here
        dropout=model_params["dropout"],
        hidden_size=model_params["hidden_size"],
    )
    state = torch.load(model_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), meta
