"""Benchmark: augmentation speed per core and the training loop's own overhead, on the CPU.

Not a test. Usage:

    python scripts/benchmark_training.py --size 224

1. Augmentation of the `final` recipe (configs/approaches/final.yaml) at ``--size`` px on one
   thread: torchvision v2 transforms applied per sample (what loader workers would run),
   kornia's random transforms on the batch (pneumo's augmentation until 2026-11-28) and
   pneumo's batch augmentation (per-sample parameters, one affine resampling per batch).
2. Loop overhead: pneumo's ``train_one_epoch`` against a bare
   ``model(x); loss.backward(); opt.step()`` loop over the same tensors (ResNet50, no
   augmentation), as a ratio of the best wall times of alternated repeats; the loop's loader
   reads an in-memory cache.
3. Loader hand-off: the main process's time in ``next(loader)`` when the loader is ahead of it
   (a sleep stands in for the GPU's step), for batches of ``--handoff-batch`` uint8 images at
   ``--size`` px from a memory-mapped array: a ``DataLoader`` with two loader processes (how
   ``fit`` read the cache until 2026-11-28) against ``CacheLoader`` with two threads (now).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torchvision.transforms import v2

FINAL = Path(__file__).resolve().parents[1] / "configs/approaches/final.yaml"


def per_sample_v2(augment, size: int) -> v2.Compose:
    """The same recipe with torchvision's per-sample transforms, for comparison only."""
    steps = [
        v2.RandomResizedCrop(size, scale=(augment.crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(augment.rotation),
        v2.RandomAffine(degrees=0.0, translate=(augment.translate,) * 2),
        v2.ColorJitter(brightness=augment.brightness, contrast=augment.contrast),
    ]
    if augment.blur_sigma > 0:
        kernel = 2 * int(np.ceil(2 * augment.blur_sigma)) + 1
        steps.append(v2.GaussianBlur(kernel, sigma=(0.1, augment.blur_sigma)))
    return v2.Compose(steps)


def kornia_sequence(augment, size: int) -> torch.nn.Sequential:
    """The same recipe with kornia's random transforms on a batch, for comparison only."""
    import kornia.augmentation as K

    return torch.nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(augment.crop_scale, 1.0)),
        K.RandomHorizontalFlip(),
        K.RandomRotation(augment.rotation, p=1.0),
        K.RandomAffine(degrees=0.0, translate=(augment.translate,) * 2, p=1.0),
        K.ColorJitter(brightness=augment.brightness, contrast=augment.contrast, p=1.0),
    )


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def best_of(repeats: int, call) -> float:
    return min(timed(call) for _ in range(repeats))


def augmentation(size: int, batch: int, repeats: int) -> dict:
    from pneumo.config import AugmentConfig
    from pneumo.core.data import BatchAugmentation

    augment = AugmentConfig(**yaml.safe_load(FINAL.read_text())["augment"])
    pixels = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    per_sample, batched = per_sample_v2(augment, size), BatchAugmentation(augment)
    kornia = kornia_sequence(augment, size)
    batched(pixels), kornia(pixels.float() / 255)  # warm-up
    v2_seconds = best_of(repeats, lambda: [per_sample(image) for image in pixels])
    kornia_seconds = best_of(repeats, lambda: kornia(pixels.float() / 255))
    batch_seconds = best_of(repeats, lambda: batched(pixels))
    return {
        "recipe": augment.model_dump(),
        "size": size,
        "batch": batch,
        "torchvision_v2_per_sample_images_per_second_per_core": round(batch / v2_seconds, 1),
        "kornia_batch_images_per_second_per_core": round(batch / kornia_seconds, 1),
        "pneumo_batch_images_per_second_per_core": round(batch / batch_seconds, 1),
    }


def loop_overhead(size: int, batch: int, batches: int, repeats: int) -> dict:
    from pneumo.core.data import CachedSplit, CacheLoader
    from pneumo.core.loop import train_one_epoch
    from pneumo.core.losses import FocalLoss
    from pneumo.core.models import build_model

    images = np.random.default_rng(0).integers(0, 256, (batch * batches, size, size), np.uint8)
    targets = np.arange(len(images)) % 2
    split = CachedSplit(images, targets, pd.DataFrame({"index": range(len(images))}))
    loader = CacheLoader(split, batch_size=batch)
    tensors = [(torch.from_numpy(images[i : i + batch])[:, None],
                torch.from_numpy(targets[i : i + batch].astype(np.float32)))
               for i in range(0, len(images), batch)]  # fmt: skip
    device = torch.device("cpu")

    def fresh():
        torch.manual_seed(0)
        model = build_model("resnet50")
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4), FocalLoss()

    def bare() -> None:
        model, optimizer, loss_fn = fresh()
        model.train()
        for x, y in tensors:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()

    def pneumo_loop() -> None:
        model, optimizer, loss_fn = fresh()
        train_one_epoch(model, loader, loss_fn, optimizer, device)

    bare(), pneumo_loop()  # warm-up
    bare_times, pneumo_times = [], []
    for _ in range(repeats):  # alternated, so a drift in the machine's speed hits both alike
        bare_times.append(timed(bare))
        pneumo_times.append(timed(pneumo_loop))
    bare_seconds, pneumo_seconds = min(bare_times), min(pneumo_times)
    return {
        "model": "resnet50",
        "size": size,
        "batch": batch,
        "batches": batches,
        "threads": torch.get_num_threads(),
        "bare_seconds": round(bare_seconds, 3),
        "pneumo_seconds": round(pneumo_seconds, 3),
        "ratio": round(pneumo_seconds / bare_seconds, 4),
    }


class RowDataset(torch.utils.data.Dataset):
    """One cached row per item, as ``fit`` read the cache through a DataLoader until
    2026-11-28; for comparison only."""

    def __init__(self, split) -> None:
        self.images, self.targets = split.images, torch.from_numpy(split.targets.astype(np.float32))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return torch.from_numpy(np.array(self.images[index][None])), self.targets[index]


def handoff_epochs(loader, sampler, step_seconds: float) -> list[dict]:
    """Three epochs: the main process's time in ``next(loader)``, a sleep for each step."""
    epochs = []
    for epoch in range(1, 4):
        sampler.set_epoch(epoch)
        waits, started, batches = [], time.perf_counter(), iter(loader)
        while True:
            asked = time.perf_counter()
            pixels = next(batches, None)
            waits.append(time.perf_counter() - asked)
            if pixels is None:
                break
            time.sleep(step_seconds)
        within = sorted(waits[1:-1])
        epochs.append({
            "first_wait_ms": round(1000 * waits[0], 1),
            "median_wait_ms": round(1000 * within[len(within) // 2], 3),
            "wait_share": round(sum(waits) / (time.perf_counter() - started), 4),
        })  # fmt: skip
    return epochs


def loader_handoff(size: int, batch: int, step_seconds: float, workers: int = 2) -> dict:
    import tempfile

    from pneumo.core.data import CachedSplit, CacheLoader, train_sampler

    with tempfile.TemporaryDirectory() as tmp:
        rows = np.lib.format.open_memmap(
            Path(tmp) / "train.npy", mode="w+", dtype=np.uint8, shape=(16 * batch, size, size)
        )
        rows[:] = np.random.default_rng(0).integers(0, 256, rows.shape, np.uint8)
        rows.flush()
        targets = np.arange(len(rows)) % 2
        split = CachedSplit(np.load(Path(tmp) / "train.npy", mmap_mode="r"), targets,
                            pd.DataFrame({"index": range(len(rows))}))  # fmt: skip
        sampler = train_sampler(targets, 0, balanced=True)
        processes = torch.utils.data.DataLoader(
            RowDataset(split), batch_size=batch, sampler=sampler, num_workers=workers,
            persistent_workers=True,
        )  # fmt: skip
        threads = CacheLoader(split, batch_size=batch, indices=sampler, threads=workers)
        return {
            "size": size, "batch": batch, "workers": workers, "step_seconds": step_seconds,
            "dataloader_processes": handoff_epochs(processes, sampler, step_seconds),
            "cache_loader_threads": handoff_epochs(threads, sampler, step_seconds),
        }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loop-size", type=int, default=64)
    parser.add_argument("--loop-batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--handoff-batch", type=int, default=256)
    parser.add_argument("--handoff-step", type=float, default=0.2, help="seconds per step")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    results = {"augmentation": augmentation(args.size, args.batch, args.repeats)}
    print(json.dumps(results["augmentation"]), flush=True)
    torch.set_num_threads(2)
    results["loop"] = loop_overhead(args.loop_size, 32, args.loop_batches, args.repeats)
    print(json.dumps(results["loop"]), flush=True)
    results["loader_handoff"] = loader_handoff(args.size, args.handoff_batch, args.handoff_step)
    print(json.dumps(results["loader_handoff"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
