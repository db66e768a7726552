"""Reading the preprocess cache for training and evaluation: datasets, transforms, samplers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from pneumo import paths
from pneumo.config import AugmentConfig
from pneumo.errors import UserError


class CacheError(UserError):
    """The preprocess cache is missing or inconsistent; rebuilding it is the remedy."""


@dataclass(frozen=True)
class CachedSplit:
    """One split of the cache: pixels (loaded whole), targets and the rows' manifest."""

    images: np.ndarray
    targets: np.ndarray
    manifest: pd.DataFrame

    @classmethod
    def load(cls, cache_dir: Path, split: str) -> CachedSplit:
        files = (
            cache_dir / paths.PROCESSED_MANIFEST.name,
            cache_dir / paths.processed_images(split).name,
        )
        missing = [str(file) for file in files if not file.is_file()]
        if missing:
            raise CacheError(f"{missing} not found: run `pneumo preprocess` (or `dvc repro`)")
        manifest = pd.read_csv(files[0])
        rows = manifest[manifest.split == split].sort_values("index").reset_index(drop=True)
        images = np.load(files[1])  # whole: faster rows
        if len(images) != len(rows):
            raise CacheError(
                f"the cache in {cache_dir} holds {len(images)} {split} images but its manifest "
                f"lists {len(rows)}: rerun `pneumo preprocess`"
            )
        return cls(images=images, targets=rows.target.to_numpy(np.int64), manifest=rows)

    def class_counts(self) -> tuple[int, int]:
        positives = int(self.targets.sum())
        return len(self.targets) - positives, positives


def cache_fingerprint(cache_dir: Path) -> str:
    """Short content hash of the cache, to tag runs with the exact data they saw."""
    digest = hashlib.sha256()
    for file in sorted(cache_dir.iterdir()):
        if file.suffix in (".npy", ".csv"):
            digest.update(file.name.encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


class ArrayDataset(Dataset):
    """Yields ``(uint8 tensor (1, H, W), float target)``; transforms run on uint8 tensors."""

    def __init__(self, split: CachedSplit, transform: v2.Transform | None = None) -> None:
        self.images = split.images
        self.targets = torch.from_numpy(split.targets.astype(np.float32))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.from_numpy(self.images[index][None].copy())
        if self.transform is not None:
            pixels = self.transform(pixels)
        return pixels, self.targets[index]


def train_transform(augment: AugmentConfig, *, size: int) -> v2.Transform:
    """The recipe's augmentations, each present only when switched on in params.yaml."""
    steps: list[v2.Transform] = []
    if augment.crop_scale < 1.0:
        steps.append(v2.RandomResizedCrop(size, scale=(augment.crop_scale, 1.0), antialias=True))
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.rotation > 0:
        steps.append(v2.RandomRotation(augment.rotation))
    if augment.translate > 0:
        steps.append(v2.RandomAffine(degrees=0.0, translate=(augment.translate,) * 2))
    if augment.brightness > 0 or augment.contrast > 0:
        steps.append(v2.ColorJitter(brightness=augment.brightness, contrast=augment.contrast))
    if augment.blur_sigma > 0:
        kernel = 2 * int(np.ceil(2 * augment.blur_sigma)) + 1
        steps.append(v2.GaussianBlur(kernel, sigma=(0.1, augment.blur_sigma)))
    return v2.Compose(steps)


def balanced_sampler(targets: np.ndarray, seed: int) -> WeightedRandomSampler:
    """Draws each class equally often on average (weights = inverse class frequency)."""
    counts = np.bincount(targets, minlength=2).astype(np.float64)
    weights = 1.0 / counts[targets]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        torch.as_tensor(weights), num_samples=len(targets), replacement=True, generator=generator
    )


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
