"""Benchmark: augmentation speed per core and the training loop's own overhead, on the CPU.

Not a test. Usage:

    python scripts/benchmark_training.py --size 224

1. Augmentation of the `final` recipe (configs/approaches/final.yaml) at ``--size`` px on one
   thread: torchvision v2 transforms applied per sample (what loader workers would run)
   against pneumo's batch augmentation (kornia, per-sample parameters, one call per batch).
2. Loop overhead: pneumo's ``train_one_epoch`` against a bare
   ``model(x); loss.backward(); opt.step()`` loop over the same tensors (ResNet50, no
   augmentation), as a ratio of wall times; the loop's loader reads an in-memory cache.
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


def best_of(repeats: int, call) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def augmentation(size: int, batch: int, repeats: int) -> dict:
    from pneumo.config import AugmentConfig
    from pneumo.data import BatchAugmentation

    augment = AugmentConfig(**yaml.safe_load(FINAL.read_text())["augment"])
    pixels = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    per_sample, batched = per_sample_v2(augment, size), BatchAugmentation(augment)
    batched(pixels)  # warm-up
    v2_seconds = best_of(repeats, lambda: [per_sample(image) for image in pixels])
    kornia_seconds = best_of(repeats, lambda: batched(pixels))
    return {
        "recipe": augment.model_dump(),
        "size": size,
        "batch": batch,
        "torchvision_v2_per_sample_images_per_second_per_core": round(batch / v2_seconds, 1),
        "kornia_batch_images_per_second_per_core": round(batch / kornia_seconds, 1),
    }


def loop_overhead(size: int, batch: int, batches: int, repeats: int) -> dict:
    from pneumo.data import ArrayDataset, CachedSplit, make_loader
    from pneumo.losses import FocalLoss
    from pneumo.models import build_model
    from pneumo.train import train_one_epoch

    images = np.random.default_rng(0).integers(0, 256, (batch * batches, size, size), np.uint8)
    targets = np.arange(len(images)) % 2
    split = CachedSplit(images, targets, pd.DataFrame({"index": range(len(images))}))
    loader = make_loader(ArrayDataset(split), batch_size=batch)
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

    bare()  # warm-up
    bare_seconds = best_of(repeats, bare)
    pneumo_seconds = best_of(repeats, pneumo_loop)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loop-size", type=int, default=64)
    parser.add_argument("--loop-batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    results = {"augmentation": augmentation(args.size, args.batch, args.repeats)}
    print(json.dumps(results["augmentation"]), flush=True)
    torch.set_num_threads(2)
    results["loop"] = loop_overhead(args.loop_size, 32, args.loop_batches, args.repeats)
    print(json.dumps(results["loop"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
