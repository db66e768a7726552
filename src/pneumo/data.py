"""Reading the preprocess cache for training and evaluation: datasets, transforms, samplers."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from pneumo import paths
from pneumo.config import AugmentConfig
from pneumo.errors import UserError


class CacheError(UserError):
    """The preprocess cache is missing or inconsistent; rebuilding it is the remedy."""


@dataclass(frozen=True)
class CachedSplit:
    """One split of the cache: pixels (memory-mapped), targets and the rows' manifest.

    Memory-mapped, a cache larger than RAM trains: the page cache keeps what fits and the
    loader workers share it.
    """

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
        images = np.load(files[1], mmap_mode="r")
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
    """Yields ``(uint8 tensor (1, H, W), float target)``: pixels exactly as cached.

    Augmentation is not done here, per sample in loader workers, but on whole batches where
    the model runs (``batch_augmentation``), so the workers only copy rows.
    """

    def __init__(self, split: CachedSplit) -> None:
        self.images = split.images
        self.targets = torch.from_numpy(split.targets.astype(np.float32))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.images[index][None])), self.targets[index]


class BatchAugmentation(nn.Module):
    """The recipe's training augmentations on a uint8 ``(N, 1, H, W)`` batch, per sample random.

    kornia draws every transform's parameters per sample and applies them to the whole batch
    on the batch's own device, so the GPU augments a batch that was moved once as uint8 (see
    docs/benchmarks.md for the measured speed against torchvision's per-sample transforms).
    Returns floats on the cache's 0..255 scale, which the models take as they are.
    """

    def __init__(self, steps: list[nn.Module]) -> None:
        super().__init__()
        self.steps = nn.Sequential(*steps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not len(self.steps):
            return pixels
        return self.steps(pixels.float() / 255.0).clamp_(0.0, 1.0) * 255.0


def batch_augmentation(augment: AugmentConfig, *, size: int) -> BatchAugmentation:
    """The augmentations switched on in params.yaml, in the recipe's order."""
    import kornia.augmentation as K

    steps: list[nn.Module] = []
    if augment.crop_scale < 1.0:
        steps.append(K.RandomResizedCrop((size, size), scale=(augment.crop_scale, 1.0), p=1.0))
    if augment.hflip:
        steps.append(K.RandomHorizontalFlip(p=0.5))
    if augment.rotation > 0:
        steps.append(K.RandomRotation(augment.rotation, p=1.0))
    if augment.translate > 0:
        steps.append(K.RandomAffine(degrees=0.0, translate=(augment.translate,) * 2, p=1.0))
    if augment.brightness > 0 or augment.contrast > 0:
        steps.append(K.ColorJitter(brightness=augment.brightness, contrast=augment.contrast, p=1.0))
    if augment.blur_sigma > 0:
        kernel = 2 * int(np.ceil(2 * augment.blur_sigma)) + 1
        steps.append(K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, augment.blur_sigma), p=1.0))
    return BatchAugmentation(steps)


class BalancedSampler(Sampler[int]):
    """Class-balanced draws with replacement (weights = inverse class frequency), shardable.

    Every epoch draws one global sequence of ``len(targets)`` indices from ``seed + epoch``;
    process ``rank`` of ``world`` takes every ``world``-th draw, so the processes of a
    distributed run see disjoint shares of the same draws a single process would see.
    ``set_epoch`` must be called before each epoch, as for ``DistributedSampler``.
    """

    def __init__(self, targets: np.ndarray, seed: int, *, rank: int = 0, world: int = 1) -> None:
        counts = np.bincount(targets, minlength=2).astype(np.float64)
        self.weights = torch.as_tensor(1.0 / counts[targets])
        self.per_rank = -(-len(targets) // world)  # ceil: every rank takes as many draws
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(
            self.weights, self.per_rank * self.world, replacement=True, generator=generator
        )
        return iter(draws[self.rank :: self.world].tolist())


def train_sampler(
    targets: np.ndarray, seed: int, *, balanced: bool, rank: int = 0, world: int = 1
) -> BalancedSampler | DistributedSampler:
    """Balanced draws, or a plain shuffle; both reshuffle per epoch through ``set_epoch``."""
    if balanced:
        return BalancedSampler(targets, seed, rank=rank, world=world)
    return DistributedSampler(
        range(len(targets)), num_replicas=world, rank=rank, shuffle=True, seed=seed
    )


def resolve_num_workers(choice: int | str, device: torch.device, nproc: int = 1) -> int:
    """``auto``: none on the CPU (the batch is augmented in-process, every core computes);
    on an accelerator, the cores this process's share leaves after the main one, up to 8."""
    if choice != "auto":
        return int(choice)
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // nproc - 1))


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    sampler: Sampler | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
