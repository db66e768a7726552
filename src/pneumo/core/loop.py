"""The training loop: one step, one epoch, validation, and ``fit`` with early stopping.

Reading order: ``train_step`` → ``train_one_epoch`` → ``validate`` → ``fit``, which builds
the run (:func:`build_run`), restores a saved state (:func:`restore`), then repeats
:func:`run_epoch` and keeps the best weights by validation loss (:class:`Progress`). No MLflow,
no files: the state to resume from comes in as a dict and goes out through ``save_state``
(pneumo.stages.train keeps it in pneumo.core.resume's file). Under ``torchrun`` every process
runs ``fit`` on its share of each batch.
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
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from pneumo import platforms
from pneumo.config import Params, TrainConfig
from pneumo.core import distributed
from pneumo.core.data import (
    BatchAugmentation,
    CachedSplit,
    CacheLoader,
    resolve_loader_threads,
    train_sampler,
)
from pneumo.core.devices import to_device
from pneumo.core.distributed import SINGLE, World
from pneumo.core.losses import build_loss
from pneumo.core.models import build_model
from pneumo.errors import UserError

log = logging.getLogger(__name__)


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


def validate(
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

    @property
    def best(self) -> dict[str, float]:
        return self.history[self.best_epoch - 1]


@dataclass
class Run:
    """Everything one fit works with, built once: loaders, network, optimiser and friends.

    ``net`` is the plain module; ``model`` is what training calls (``net`` wrapped in DDP
    and/or compiled by :func:`wrap_for_training`, after a restore). Validation and BatchNorm
    recomputation use ``net``: DDP's forward would synchronise buffers across processes at
    every batch, and the processes' shards may differ by one batch.
    """

    net: nn.Module
    model: nn.Module
    sampler: Any
    train_loader: CacheLoader
    precise_bn_loader: CacheLoader
    val_loader: CacheLoader
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    precision: Precision
    augment: BatchAugmentation


@dataclass
class Progress:
    """Where early stopping stands; saved after every epoch, so a resumed run continues it."""

    best_state: dict[str, torch.Tensor] | None = None
    best_loss: float = math.inf
    stale: int = 0
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0
    stopped: bool = False


def build_run(
    params: Params, backbone: str, cache_dir: Path, device: torch.device, world: World
) -> Run:
    cfg = params.train
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
    return Run(
        net=net, model=net, sampler=sampler, train_loader=train_loader,
        precise_bn_loader=precise_bn_loader, val_loader=val_loader, loss_fn=loss_fn,
        optimizer=optimizer, scheduler=_scheduler(optimizer, cfg),
        scaler=precision.grad_scaler(), precision=precision, augment=augment,
    )  # fmt: skip


def wrap_for_training(run: Run, config: TrainConfig, device: torch.device, world: World) -> None:
    """``run.model``: the network in DDP under torchrun (which broadcasts rank 0's weights, so
    after a restore), compiled when ``train.compile`` asks for it."""
    model: nn.Module = run.net
    if world.distributed:
        model = nn.parallel.DistributedDataParallel(
            run.net, device_ids=[device.index] if device.type == "cuda" else None
        )
    run.model = torch.compile(model) if config.compile else model


def restore(run: Run, saved: dict[str, Any]) -> Progress:
    """Put a saved state back into ``run``; returns the progress it had reached."""
    run.net.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(saved["scheduler"])
    if run.scaler is not None:
        run.scaler.load_state_dict(saved["scaler"])
    return Progress(
        best_state=saved["best_state"], best_loss=saved["best_loss"], stale=saved["stale"],
        best_epoch=saved["best_epoch"], history=saved["history"], epoch=saved["epoch"],
        stopped=saved["stopped"],
    )  # fmt: skip


def state_of(run: Run, progress: Progress) -> dict[str, Any]:
    """What :func:`restore` needs to continue after ``progress.epoch``."""
    scheduler, scaler = run.scheduler, run.scaler
    return {
        "epoch": progress.epoch, "stopped": progress.stopped,
        "model": run.net.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "best_state": progress.best_state, "best_loss": progress.best_loss,
        "stale": progress.stale, "best_epoch": progress.best_epoch, "history": progress.history,
    }  # fmt: skip


def run_epoch(
    run: Run, params: Params, epoch: int, device: torch.device, world: World
) -> dict[str, float]:
    """Train one epoch, recompute BatchNorm statistics, validate, step the scheduler."""
    seed_epoch(params.seed, epoch, world)
    run.sampler.set_epoch(epoch)
    lr = run.optimizer.param_groups[0]["lr"]
    stats = train_one_epoch(
        run.model, run.train_loader, run.loss_fn, run.optimizer, device, run.precision,
        run.scaler, run.augment, world,
    )  # fmt: skip
    if params.train.precise_bn:
        recompute_batchnorm_statistics(run.net, run.precise_bn_loader, device, run.precision)
    stats |= validate(run.net, run.val_loader, run.loss_fn, device, run.precision, world)
    stats |= {"epoch": epoch, "lr": lr}
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(stats["val_loss"])
    elif run.scheduler is not None:
        run.scheduler.step()
    return stats


def keep_best(progress: Progress, net: nn.Module, stats: dict[str, float]) -> None:
    """Record the epoch; its weights become the best when the validation loss went down."""
    progress.history.append(stats)
    progress.epoch = int(stats["epoch"])
    if stats["val_loss"] < progress.best_loss:
        progress.best_loss, progress.stale, progress.best_epoch = (
            stats["val_loss"],
            0,
            progress.epoch,
        )
        progress.best_state = copy.deepcopy({k: v.cpu() for k, v in net.state_dict().items()})
    else:
        progress.stale += 1


def fit(
    params: Params,
    backbone: str,
    cache_dir: Path,
    device: torch.device,
    *,
    world: World = SINGLE,
    saved: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train with early stopping on validation loss; returns the model at its best epoch.

    ``saved`` (a state ``save_state`` received before) continues that run; ``save_state``
    receives the state after every epoch, ``on_epoch`` each epoch's statistics (restored
    epochs included).
    """
    cfg = params.train
    set_seed(params.seed)
    platforms.use_kernels(cfg.deterministic)
    run = build_run(params, backbone, cache_dir, device, world)
    progress = Progress()
    if saved is not None:
        progress = restore(run, saved)
        log.info("%s: resuming after epoch %d", backbone, progress.epoch)
        for stats in progress.history:
            if on_epoch is not None:
                on_epoch(stats)
    wrap_for_training(run, cfg, device, world)
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        if progress.stopped:
            break
        stats = run_epoch(run, params, epoch, device, world)
        log.info(
            "%s epoch %d/%d train_loss %.4f val_loss %.4f val_auc %.4f (%.0f img/s, "
            "%.0f%% waiting for data)",
            backbone, epoch, cfg.epochs, stats["train_loss"], stats["val_loss"],
            stats["val_auc"], stats["images_per_second"], 100 * stats["data_wait_fraction"],
        )  # fmt: skip
        keep_best(progress, run.net, stats)
        progress.stopped = distributed.agree(world, progress.stale >= cfg.patience, device)
        if progress.stopped:
            log.info("early stop: val loss has not improved for %d epochs", progress.stale)
        if on_epoch is not None:
            on_epoch(stats)
        if save_state is not None and world.is_main:
            save_state(state_of(run, progress))
    run.net.load_state_dict(progress.best_state)
    return FitResult(run.net, progress.best_epoch, progress.history)
