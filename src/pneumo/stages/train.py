"""Stage `train@<backbone>`: fit one backbone on the cache, keep the best epoch by val loss.

Reading order: ``train_step`` → ``train_one_epoch`` → ``evaluate`` → ``fit`` → ``train`` (the
stage: tracking and outputs). Outputs are staged in a temporary folder and moved into place at
the very end, so an interrupted run never leaves a checkpoint that looks complete; the state
needed to continue it is kept after every epoch (pneumo.core.resume). Under ``torchrun`` every
process runs ``fit`` on its share of each batch and only the main one writes files and logs to
MLflow.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from pneumo import platforms
from pneumo.config import CLASS_NAMES, Params, TrainConfig, flatten
from pneumo.core import distributed, resume
from pneumo.core.data import (
    BatchAugmentation,
    CachedSplit,
    CacheLoader,
    cache_fingerprint,
    resolve_loader_threads,
    train_sampler,
)
from pneumo.core.devices import resolve_device, to_device
from pneumo.core.distributed import SINGLE, World
from pneumo.core.losses import build_loss
from pneumo.core.models import build_model, normalisation
from pneumo.errors import UserError
from pneumo.figures import png_figure
from pneumo.files import staged_dir, write_text_atomic
from pneumo.mlops import tracking
from pneumo.records import ModelCard, TrainSummary

log = logging.getLogger(__name__)

CURVES_PNG = "curves.png"
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "lr"]


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite."""


def set_seed(seed: int) -> None:
    """Seed every generator: Python's, NumPy's and torch's (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, world: World = SINGLE) -> None:
    """Each epoch's random streams (augmentation, dropout) follow from (seed, epoch, rank)
    alone, so a run resumed at epoch k + 1 draws exactly what an uninterrupted run draws."""
    set_seed(seed * 1_000_003 + epoch * 1_009 + world.rank)


@dataclass(frozen=True)
class Precision:
    """How batches run on the device: autocast dtype (None = fp32) and memory format."""

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def for_device(cls, device: torch.device, config: TrainConfig) -> Precision:
        """Mixed precision and channels_last apply on CUDA; other devices run fp32."""
        if device.type != "cuda":
            return cls()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[config.amp]
        return cls(dtype, config.channels_last)

    def to_input(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        pixels = to_device(pixels, device)
        return (
            pixels.contiguous(memory_format=torch.channels_last) if self.channels_last else pixels
        )

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(
            device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """float16 gradients underflow without loss scaling; bfloat16 has float32's range."""
        return torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None


def train_step(
    model: nn.Module,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: Precision = Precision(),
    scaler: torch.amp.GradScaler | None = None,
    augment: BatchAugmentation | None = None,
) -> torch.Tensor:
    """One optimisation step on a batch already on the device. Returns the loss unread: reading
    it would make the host wait for the GPU."""
    if augment is not None:
        pixels = augment(pixels)
    with precision.autocast(pixels.device):
        loss = loss_fn(model(pixels).float(), targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss


def train_one_epoch(
    model: nn.Module,
    loader: CacheLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: Precision = Precision(),
    scaler: torch.amp.GradScaler | None = None,
    augment: BatchAugmentation | None = None,
    world: World = SINGLE,
) -> dict[str, float]:
    """One pass over the loader; the loss is summed on the device and read once per epoch.

    ``data_wait_fraction`` is the share of the epoch spent waiting for the loader's next batch.
    """
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    seen, waited, start = 0, 0.0, time.perf_counter()
    batches = iter(tqdm(loader, desc="train", unit="batch", leave=False, disable=None))
    while True:
        asked = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        pixels, targets = batch
        pixels = precision.to_input(pixels, device)
        targets = to_device(targets, device)
        loss = train_step(model, pixels, targets, loss_fn, optimizer, precision, scaler, augment)
        total += loss.detach() * len(targets)
        seen += len(targets)
    loss_sum, images = distributed.sum_across(world, total.item(), seen, device=device)
    if not math.isfinite(loss_sum):
        raise TrainingDivergedError(
            f"training loss became {loss_sum} during this epoch: lower train.lr"
        )
    elapsed = time.perf_counter() - start
    return {
        "train_loss": loss_sum / images,
        "images_per_second": images / elapsed,
        "data_wait_fraction": waited / elapsed,
    }


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    loader: CacheLoader,
    device: torch.device,
    precision: Precision = Precision(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of a whole loader, in loader order, on the device."""
    model.eval()
    logits, targets = [], []
    for pixels, target in loader:
        with precision.autocast(device):
            logits.append(model(precision.to_input(pixels, device)).float())
        targets.append(to_device(target, device))
    return torch.cat(logits), torch.cat(targets)


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


@torch.no_grad()
def recompute_batchnorm_statistics(
    model: nn.Module, loader: CacheLoader, device: torch.device, precision: Precision = Precision()
) -> None:
    """Precise BatchNorm: running means and variances recomputed with the current weights.

    During training the running statistics are an exponential average over batches taken
    with weights that kept changing. In short runs from scratch (the generated sample: 40
    steps) they lag so far behind the final weights that eval-mode outputs shrink layer after
    layer until every image gets the same score (EfficientNet-B4 first: test AUC 0.50).
    Here every BatchNorm layer forgets them and averages the batch statistics of ``loader``
    (unaugmented training images) with equal weights, while every other layer stays in eval
    mode (no dropout, no drop-connect), so no random number is drawn. Wu & Johnson,
    "Rethinking 'Batch' in BatchNorm" (2021), section 3.
    """
    norms = [module for module in model.modules() if isinstance(module, BATCH_NORMS)]
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over the batches that follow
        norm.train()
    for pixels, _ in loader:
        with precision.autocast(device):
            model(precision.to_input(pixels, device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


def precise_bn_rows(targets: np.ndarray, images: int) -> list[int]:
    """``images`` training rows spread evenly over the cache (all of them if it has fewer):
    both classes, the same rows in every epoch and every process, no random draw."""
    spread = np.linspace(0, len(targets) - 1, min(images, len(targets)))
    return np.unique(spread.astype(int)).tolist()


def evaluate(
    model: nn.Module,
    loader: CacheLoader,
    loss_fn: nn.Module,
    device: torch.device,
    precision: Precision = Precision(),
    world: World = SINGLE,
) -> dict[str, float]:
    """Validation loss and AUC; under torchrun each process predicts a shard and the shards
    are gathered, so every process computes the same numbers on the whole split."""
    logits, targets = predict_logits(model, loader, device, precision)
    logits = distributed.gather_rows(world, logits)
    targets = distributed.gather_rows(world, targets)
    loss = loss_fn(logits, targets).item()
    logits, targets = logits.cpu().numpy(), targets.cpu().numpy()
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
    resumed_from_epoch: int = 0

    @property
    def best(self) -> dict[str, float]:
        return self.history[self.best_epoch - 1]


def fit(
    params: Params,
    backbone: str,
    cache_dir: Path,
    device: torch.device,
    *,
    world: World = SINGLE,
    state_path: Path | None = None,
    run_id: str = "",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train with early stopping on validation loss; returns the model at its best epoch.

    With ``state_path``, the state after every epoch is saved there and an existing state is
    resumed from; ``on_epoch`` receives each epoch's statistics (restored epochs included).
    """
    cfg = params.train
    set_seed(params.seed)
    platforms.use_kernels(cfg.deterministic)
    train_split = CachedSplit.load(cache_dir, "train")
    val_split = CachedSplit.load(cache_dir, "val")
    threads = resolve_loader_threads(cfg.num_workers, device, world.size)
    pin = device.type == "cuda"
    sampler = train_sampler(
        train_split.targets, params.seed, balanced=cfg.weighted_sampler,
        rank=world.rank, world=world.size,
    )  # fmt: skip
    train_loader = CacheLoader(
        train_split, batch_size=cfg.batch_size // world.size, indices=sampler,
        threads=threads, pin_memory=pin,
    )  # fmt: skip
    # Every process recomputes BatchNorm statistics on the same rows: no gathering needed.
    precise_bn_loader = CacheLoader(
        train_split, batch_size=cfg.batch_size,
        indices=precise_bn_rows(train_split.targets, cfg.precise_bn),
        threads=threads, pin_memory=pin,
    )  # fmt: skip
    val_loader = CacheLoader(  # under torchrun, each process predicts every world.size-th row
        val_split, batch_size=params.evaluate.batch_size,
        indices=range(world.rank, len(val_split.targets), world.size),
        threads=threads, pin_memory=pin,
    )  # fmt: skip

    net = build_model(
        backbone,
        pretrained=params.model.pretrained,
        dropout=params.model.dropout,
        hidden_size=params.model.hidden_size,
    )
    if cfg.sync_batchnorm and world.distributed:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    precision = Precision.for_device(device, cfg)
    net = net.to(device)
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)
    augment = BatchAugmentation(params.augment).to(device)
    loss_fn = build_loss(params.loss, *train_split.class_counts()).to(device)
    # Fused AdamW on CUDA: one kernel for all parameters, and with GradScaler it checks for
    # inf gradients on the device instead of synchronising the host every step.
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    scheduler = _scheduler(optimizer, cfg)
    scaler = precision.grad_scaler()

    result = FitResult(model=net, best_epoch=0)
    best_state, best_loss, stale = None, math.inf, 0
    saved = resume.load(state_path) if state_path is not None and cfg.resume else None
    if saved is not None:
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(saved["scaler"])
        best_state, best_loss, stale = saved["best_state"], saved["best_loss"], saved["stale"]
        result.best_epoch, result.history = saved["best_epoch"], saved["history"]
        result.resumed_from_epoch = saved["epoch"]
        log.info("%s: resuming after epoch %d", backbone, saved["epoch"])
        for stats in result.history:
            if on_epoch is not None:
                on_epoch(stats)

    model: nn.Module = net
    if world.distributed:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        model = torch.compile(model)

    stop = saved is not None and saved["stopped"]
    for epoch in range(result.resumed_from_epoch + 1, cfg.epochs + 1):
        if stop:
            break
        seed_epoch(params.seed, epoch, world)
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(
            model, train_loader, loss_fn, optimizer, device, precision, scaler, augment, world
        )
        # The plain module: DDP's forward would synchronise buffers across processes at
        # every validation batch, and the processes' shards may differ by one batch.
        if cfg.precise_bn:
            recompute_batchnorm_statistics(net, precise_bn_loader, device, precision)
        stats |= evaluate(net, val_loader, loss_fn, device, precision, world)
        stats |= {"epoch": epoch, "lr": lr}
        result.history.append(stats)
        log.info(
            "%s epoch %d/%d train_loss %.4f val_loss %.4f val_auc %.4f (%.0f img/s, "
            "%.0f%% waiting for data)",
            backbone, epoch, cfg.epochs, stats["train_loss"], stats["val_loss"],
            stats["val_auc"], stats["images_per_second"], 100 * stats["data_wait_fraction"],
        )  # fmt: skip
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(stats["val_loss"])
        elif scheduler is not None:
            scheduler.step()
        if stats["val_loss"] < best_loss:
            best_loss, stale, result.best_epoch = stats["val_loss"], 0, epoch
            best_state = copy.deepcopy({k: v.cpu() for k, v in net.state_dict().items()})
        else:
            stale += 1
        stop = distributed.agree(world, stale >= cfg.patience, device)
        if stop:
            log.info("early stop: val loss has not improved for %d epochs", stale)
        if on_epoch is not None:
            on_epoch(stats)
        if state_path is not None and world.is_main:
            resume.save(state_path, {
                "epoch": epoch, "stopped": stop, "run_id": run_id,
                "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "best_state": best_state, "best_loss": best_loss, "stale": stale,
                "best_epoch": result.best_epoch, "history": result.history,
            })  # fmt: skip
    net.load_state_dict(best_state)
    return result


def _curves_png(history: pd.DataFrame, backbone: str, path: Path) -> None:
    with png_figure(path, 1, 2, figsize=(9, 3.5)) as (_, (left, right)):
        left.plot(history.epoch, history.train_loss, "o-", label="train")
        left.plot(history.epoch, history.val_loss, "o-", label="validation")
        left.set(xlabel="epoch", ylabel="loss", title=f"{backbone}: loss")
        left.legend()
        right.plot(history.epoch, history.val_auc, "o-", color="C2")
        right.set(xlabel="epoch", ylabel="ROC AUC", title="validation AUC", ylim=(0, 1.02))


def train(
    params: Params,
    backbone: str,
    cache_dir: Path,
    checkpoint_dir: Path,
    report_dir: Path,
    history_file: Path,
) -> dict[str, float]:
    """The stage: fit, log the run to MLflow, write checkpoint, meta, metrics and history.

    Every process of a torchrun launch calls this; only the main one tracks and writes.
    """
    world = distributed.from_environment()
    device = resolve_device(params.train.device, local_rank=world.local_rank)
    distributed.init(world, device)
    try:
        data_hash = cache_fingerprint(cache_dir)
        state_path = resume.state_file(
            tracking.repo_root(),
            backbone,
            resume.run_key(params, backbone, data_hash, device.type, world.size),
        )
        if not world.is_main:
            fit(params, backbone, cache_dir, device, world=world, state_path=state_path)
            return {}
        return _tracked_training(
            params, backbone, cache_dir, device, world, data_hash, state_path,
            outputs=(checkpoint_dir, report_dir, history_file),
        )  # fmt: skip
    finally:
        distributed.shutdown(world)


def _tracked_training(
    params: Params,
    backbone: str,
    cache_dir: Path,
    device: torch.device,
    world: World,
    data_hash: str,
    state_path: Path,
    *,
    outputs: tuple[Path, Path, Path],
) -> dict[str, float]:
    checkpoint_dir, report_dir, history_file = outputs
    resume.discard_others(state_path)
    saved = resume.load(state_path) if params.train.resume else None
    run_name = f"{tracking.experiment_name()}-{backbone}"
    tags = tracking.context_tags(f"train@{backbone}", data_hash) | {"backbone": backbone}
    if saved is not None:
        tags |= {"resumed_from_epoch": str(saved["epoch"]), "resumed_from_run": saved["run_id"]}
    # start_run closes this stage's runs whose process is gone (SIGKILL); the run resumed
    # from is closed by id as well, in case it is not among them (another experiment).
    with tracking.start_run(params.tracking, run_name=run_name, tags=tags) as run:
        if saved is not None:
            tracking.close_run(saved["run_id"], status="KILLED", closed_by=run.info.run_id)
        tracking.log_params(
            flatten(params)
            | {"backbone": backbone, "device": str(device), "world_size": world.size}
        )
        started = time.perf_counter()
        result = fit(
            params, backbone, cache_dir, device, world=world, state_path=state_path,
            run_id=run.info.run_id,
            on_epoch=lambda stats: tracking.log_metrics(
                {k: v for k, v in stats.items() if k != "epoch"}, step=int(stats["epoch"])
            ),
        )  # fmt: skip
        seconds = time.perf_counter() - started
        # Measured speed goes to MLflow only: committed, DVC-tracked files stay deterministic.
        tracking.log_metrics({"train_seconds": seconds})
        history = pd.DataFrame(result.history)[HISTORY_COLUMNS]
        summary = TrainSummary(
            best_epoch=result.best_epoch,
            epochs_run=len(result.history),
            best_val_loss=result.best["val_loss"],
            best_val_auc=result.best["val_auc"],
        )
        card = ModelCard(
            backbone=backbone,
            class_names=list(CLASS_NAMES),
            image_size=params.data.image_size,
            resize=params.data.resize,
            normalisation=normalisation(params.model.pretrained),
            best_epoch=result.best_epoch,
            data_hash=data_hash,
            # Not where runs are logged nor the promotion gate: they say nothing about the model.
            params=params.model_dump(mode="json", exclude={"tracking", "registry"}),
            platform=platforms.describe(device),
        )

        with staged_dir(checkpoint_dir) as staging:
            torch.save(result.model.cpu().state_dict(), ModelCard.weights(staging))
            card_file = card.write(staging)
            _curves_png(history, backbone, staging / CURVES_PNG)
            tracking.log_metrics({f"best_{k}": v for k, v in result.best.items() if k != "epoch"})
            tracking.log_artifacts([ModelCard.weights(staging), card_file, staging / CURVES_PNG])
            tracking.log_dict(params.model_dump(mode="json"), "params.json")
    tracking.remember_training_run(ModelCard.weights(checkpoint_dir), run.info.run_id)
    write_text_atomic(history_file, history.to_csv(index=False))
    summary.write(report_dir)
    state_path.unlink(missing_ok=True)  # finished: nothing left to resume
    log.info("%s: best epoch %d, val AUC %.4f", backbone, result.best_epoch, summary.best_val_auc)
    return summary.model_dump()
