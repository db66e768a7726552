"""Reading the preprocess cache for training and evaluation: datasets, transforms, samplers."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

from pneumo import paths
from pneumo.config import AugmentConfig
from pneumo.core.devices import to_device
from pneumo.errors import UserError
from pneumo.files import feed


class CacheError(UserError):
    """The preprocess cache is missing or inconsistent; rebuilding it is the remedy."""


@dataclass(frozen=True)
class CachedSplit:
    """One split of the cache: pixels (memory-mapped), targets and the rows' manifest.

    Memory-mapped, a cache larger than RAM trains: the page cache keeps what fits.
    """

    images: np.ndarray
    targets: np.ndarray
    manifest: pd.DataFrame

    @classmethod
    def load(cls, cache_dir: Path, split: str) -> CachedSplit:
        files = (
            cache_dir / paths.MANIFEST,
            cache_dir / paths.cache_images(split),
        )
        missing = [str(file) for file in files if not file.is_file()]
        if missing:
            raise CacheError(f"{missing} not found: run `pneumo preprocess` (or `dvc repro`)")
        manifest = pd.read_csv(files[0])
        rows = manifest[manifest.split == split].sort_values("index").reset_index(drop=True)
        # Read-only: a private writable map ("c") would reserve the file's size in memory, and
        # one larger than RAM plus swap would not open.
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
            feed(digest, file)
    return digest.hexdigest()[:12]


def affine_theta(
    crop: torch.Tensor, flip: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``(N, 2, 3)`` maps for ``F.affine_grid``: a crop, then a flip, a rotation and a shift.

    In normalised coordinates (-1..1 across a square image). ``crop`` is ``(N, 4)``: the
    box's centre x, y and half-sizes w, h; ``flip`` is -1 (mirror) or 1; ``angle`` is in
    radians, counter-clockwise as torchvision's ``rotate``; ``shift`` is ``(N, 2)``. The map
    sends each output pixel to where it samples the input: the inverses of the transforms,
    the last one first.
    """
    n = len(angle)
    box, mirror, turn, move = (torch.eye(3).repeat(n, 1, 1) for _ in range(4))
    box[:, 0, 0], box[:, 1, 1] = crop[:, 2], crop[:, 3]
    box[:, :2, 2] = crop[:, :2]
    mirror[:, 0, 0] = flip
    cos, sin = torch.cos(angle), torch.sin(angle)
    turn[:, 0, 0], turn[:, 0, 1], turn[:, 1, 0], turn[:, 1, 1] = cos, -sin, sin, cos
    move[:, :2, 2] = -shift
    return (box @ mirror @ turn @ move)[:, :2]


class BatchAugmentation(nn.Module):
    """The recipe's training augmentations on a uint8 ``(N, 1, H, W)`` batch, per sample random.

    Every sample's parameters are drawn on the CPU from torch's global generator (so
    ``seed_epoch`` fixes them, whatever the device) and go to the batch's device in one
    non-blocking copy; crop, flip, rotation and shift make one affine map, so the batch is
    resampled once, not once per transform. The host never waits for the GPU: kornia's random
    transforms, used before, made it wait 11 times per batch (docs/benchmarks.md).

    Semantics: the crop is ``RandomResizedCrop``'s (area ``crop_scale``..1, aspect ratio
    3/4..4/3, the box inside the image), the flip has p = 0.5, rotation and shift are uniform
    in ±``rotation`` degrees and ±``translate`` of the side, then torchvision ``ColorJitter``'s
    brightness and contrast factors (in that order) and a Gaussian blur with sigma
    0.1..``blur_sigma``. Returns floats on the cache's 0..255 scale, which the models take as
    they are.
    """

    def __init__(self, config: AugmentConfig) -> None:
        super().__init__()
        self.config = config
        self.geometric = (
            config.crop_scale < 1.0 or config.hflip or config.rotation > 0 or config.translate > 0
        )
        self.active = (
            self.geometric or config.brightness > 0 or config.contrast > 0 or config.blur_sigma > 0
        )

    def draw(self, n: int) -> torch.Tensor:
        """``(N, 9)`` per sample: the affine map's six entries, brightness, contrast, sigma."""
        c = self.config
        u = torch.rand(n, 11)

        def spread(column: int, low: float, high: float) -> torch.Tensor:
            return low + (high - low) * u[:, column]

        area = spread(0, c.crop_scale, 1.0)
        # Log-uniform aspect ratio within 3/4..4/3, narrowed per sample to the ratios whose
        # box of that area fits the image (area <= ratio <= 1 / area): the area is kept as
        # drawn, where clamping the box would shrink it below crop_scale.
        low, high = area.clamp(min=3 / 4).log(), (1 / area).clamp(max=4 / 3).log()
        ratio = torch.exp(low + (high - low) * u[:, 1])
        half_w, half_h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
        centre = (1 - torch.stack([half_w, half_h], 1)) * (2 * u[:, 2:4] - 1)
        flip = torch.where((u[:, 4] < 0.5) & c.hflip, -1.0, 1.0)
        angle = spread(5, -c.rotation, c.rotation).deg2rad()
        shift = (2 * u[:, 6:8] - 1) * 2 * c.translate  # the side spans 2 units
        theta = affine_theta(torch.column_stack([centre, half_w, half_h]), flip, angle, shift)
        brightness = spread(8, 1 - c.brightness, 1 + c.brightness)
        contrast = spread(9, 1 - c.contrast, 1 + c.contrast)
        sigma = spread(10, 0.1, max(c.blur_sigma, 0.1))
        return torch.column_stack([theta.flatten(1), brightness, contrast, sigma])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return pixels
        n, c = len(pixels), self.config
        params = self.draw(n)
        if pixels.is_cuda:
            params = params.pin_memory()
        params = to_device(params, pixels.device)
        x = pixels.float() / 255.0
        if self.geometric:
            grid = F.affine_grid(params[:, :6].view(n, 2, 3), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        factor = params[:, 6:8].view(n, 2, 1, 1, 1)
        if c.brightness > 0:
            x = (x * factor[:, 0]).clamp_(0.0, 1.0)
        if c.contrast > 0:
            mean = x.mean((1, 2, 3), keepdim=True)
            x = ((x - mean) * factor[:, 1] + mean).clamp_(0.0, 1.0)
        if c.blur_sigma > 0:
            from kornia.filters import gaussian_blur2d

            kernel = 2 * int(np.ceil(2 * c.blur_sigma)) + 1
            x = gaussian_blur2d(x, (kernel, kernel), params[:, 8:9].expand(n, 2))
        return x.clamp_(0.0, 1.0) * 255.0


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


def resolve_loader_threads(choice: int | str, device: torch.device, nproc: int = 1) -> int:
    """``auto``: none on the CPU (every core computes; the main thread reads each batch when
    asked); on an accelerator, the cores this process's share leaves after the main one, up to
    4: one thread gathers a batch of 256 rows at 224 px in about a millisecond from memory, and
    more only help a cache read from disk."""
    if choice != "auto":
        return int(choice)
    if device.type == "cpu":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // nproc - 1))


class CacheLoader:
    """Batches of cached rows: ``(uint8 (B, 1, H, W), float32 (B,))``, in the sampler's order.

    Not a ``DataLoader``: the rows need no decoding and augmentation runs on the batch where
    the model runs (``BatchAugmentation``), so the only work per batch is one gather from the
    memory map. Loader processes would add a hand-off per batch (about 3 ms of the main
    process's time for 256 rows at 224 px, docs/benchmarks.md), which a fast GPU waits for.
    Here ``threads`` background threads gather whole batches, up to ``prefetch_per_thread``
    batches ahead each; with no threads the main thread reads each batch when asked.
    ``indices`` (a sampler, iterated anew every epoch, or a sequence) defaults to every row in
    order; the last batch may be short, as a ``DataLoader``'s.
    """

    def __init__(
        self,
        split: CachedSplit,
        *,
        batch_size: int,
        indices: Sampler[int] | Sequence[int] | None = None,
        threads: int = 0,
        pin_memory: bool = False,
        prefetch_per_thread: int = 2,
    ) -> None:
        self.images = np.asarray(split.images)  # the map as a plain read-only array, no copy
        self.targets = split.targets.astype(np.float32)
        rows = indices if indices is not None else range(len(self.targets))
        self.batches = BatchSampler(rows, batch_size, drop_last=False)
        self.threads, self.pin_memory = threads, pin_memory
        self.ahead = threads * prefetch_per_thread

    def __len__(self) -> int:
        return len(self.batches)

    def read(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # numpy gathers on the calling thread alone and releases the GIL while it copies; a
        # torch copy or gather of this size would start a thread team in every loader thread.
        # Page-locked buffers come from the caching host allocator, which hands one out again
        # only once the batch's copy to the GPU has finished.
        pixels = torch.empty(
            (len(indices), 1, *self.images.shape[1:]), dtype=torch.uint8,
            pin_memory=self.pin_memory,
        )  # fmt: skip
        np.take(self.images, indices, axis=0, out=pixels.numpy()[:, 0])
        targets = torch.from_numpy(self.targets[indices])
        return pixels, targets.pin_memory() if self.pin_memory else targets

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.threads:
            yield from map(self.read, self.batches)
            return
        batches = iter(self.batches)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="pneumo-loader") as pool:
            pending = deque(pool.submit(self.read, batch) for batch in islice(batches, self.ahead))
            try:
                while pending:
                    ready = pending.popleft().result()
                    following = next(batches, None)
                    if following is not None:
                        pending.append(pool.submit(self.read, following))
                    yield ready
            finally:  # stopped early: drop what has not started
                for future in pending:
                    future.cancel()
