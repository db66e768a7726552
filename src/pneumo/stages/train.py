"""Stage `train@<backbone>`: fit one backbone on the cache (:mod:`pneumo.core.loop`), log the
run to MLflow, write the checkpoint, its card and the training curves.

Outputs are staged in a temporary folder and moved into place at the very end, so an
interrupted run never leaves a checkpoint that looks complete; the state needed to continue
it is kept after every epoch (:mod:`pneumo.core.resume`), loaded once here and handed to
``fit``. Under ``torchrun`` every process fits and only the main one writes files and logs to
MLflow.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pneumo import paths, platforms
from pneumo.config import CLASS_NAMES, Params, flatten
from pneumo.core import distributed, resume
from pneumo.core.data import cache_fingerprint
from pneumo.core.devices import resolve_device
from pneumo.core.distributed import World
from pneumo.core.loop import fit
from pneumo.core.models import normalisation
from pneumo.figures import png_figure
from pneumo.files import staged_dir, write_text_atomic
from pneumo.mlops import store, tracking
from pneumo.records import ModelCard, TrainSummary

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "lr"]


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
            store.repo_root(),
            backbone,
            resume.run_key(params, backbone, data_hash, device.type, world.size),
        )
        if world.is_main:
            resume.discard_others(state_path)
        saved = resume.load(state_path) if params.train.resume else None
        if not world.is_main:
            fit(params, backbone, cache_dir, device, world=world, saved=saved)
            return {}
        return _tracked_training(
            params, backbone, cache_dir, device, world, data_hash, (state_path, saved),
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
    resumable: tuple[Path, dict[str, Any] | None],
    *,
    outputs: tuple[Path, Path, Path],
) -> dict[str, float]:
    """``resumable``: the state file and the state it held when the stage started."""
    state_path, saved = resumable
    checkpoint_dir, report_dir, history_file = outputs
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
            params, backbone, cache_dir, device, world=world, saved=saved,
            # The run id goes with the state, so a resumed run can close this one.
            save_state=lambda state: resume.save(state_path, state | {"run_id": run.info.run_id}),
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
            _curves_png(history, backbone, staging / paths.CURVES_PNG)
            tracking.log_metrics({f"best_{k}": v for k, v in result.best.items() if k != "epoch"})
            tracking.log_artifacts(
                [ModelCard.weights(staging), card_file, staging / paths.CURVES_PNG]
            )
            tracking.log_dict(params.model_dump(mode="json"), "params.json")
    tracking.remember_training_run(ModelCard.weights(checkpoint_dir), run.info.run_id)
    write_text_atomic(history_file, history.to_csv(index=False))
    summary.write(report_dir)
    state_path.unlink(missing_ok=True)  # finished: nothing left to resume
    log.info("%s: best epoch %d, val AUC %.4f", backbone, result.best_epoch, summary.best_val_auc)
    return summary.model_dump()
