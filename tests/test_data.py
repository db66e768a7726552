"""pneumo.core.data: the preprocess cache (a missing or inconsistent one says how to rebuild
it), batch augmentation, samplers and the cache loader."""

from __future__ import annotations

import math
import threading

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode

from pneumo.config import AugmentConfig
from pneumo.core.data import (
    BalancedSampler,
    BatchAugmentation,
    CachedSplit,
    CacheError,
    CacheLoader,
    affine_theta,
    train_sampler,
)


def test_missing_cache_says_to_run_preprocess(tmp_path):
    with pytest.raises(CacheError, match=r"manifest\.csv.*not found: run `pneumo preprocess`"):
        CachedSplit.load(tmp_path, "train")


def test_cache_whose_arrays_and_manifest_disagree_is_refused(tmp_path):
    pd.DataFrame({"split": ["train"] * 3, "index": [0, 1, 2], "target": [0, 1, 1]}).to_csv(
        tmp_path / "manifest.csv", index=False
    )
    np.save(tmp_path / "train_images.npy", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(CacheError, match="holds 2 train images but its manifest lists 3"):
        CachedSplit.load(tmp_path, "train")


# --- batch augmentation, samplers and the cache loader -------------------------------------------


RECIPE = AugmentConfig(
    rotation=15, hflip=True, translate=0.1, brightness=0.2, contrast=0.2, blur_sigma=1.0,
    crop_scale=0.8,
)  # fmt: skip


def _gradient_batch(n: int, size: int = 32) -> torch.Tensor:
    row = torch.linspace(0, 255, size).to(torch.uint8)
    return row.repeat(n, 1, size, 1)  # a left-to-right ramp: flips and shifts show


def test_batch_augmentation_draws_its_parameters_per_sample():
    torch.manual_seed(0)
    out = BatchAugmentation(RECIPE)(_gradient_batch(16))
    assert out.shape == (16, 1, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    flat = out.flatten(1)
    distinct = {tuple(row.round().tolist()) for row in flat}
    assert len(distinct) == 16  # identical inputs, sixteen different outputs


def test_batch_augmentation_repeats_with_the_seed_and_is_off_when_switched_off():
    batch = _gradient_batch(8)
    augment = BatchAugmentation(RECIPE)
    torch.manual_seed(1)
    first = augment(batch)
    torch.manual_seed(1)
    assert torch.equal(first, augment(batch))
    off = AugmentConfig(
        rotation=0, hflip=False, translate=0, brightness=0, contrast=0, crop_scale=1.0
    )
    assert torch.equal(BatchAugmentation(off)(batch), batch)


def test_each_augmentation_has_the_recipe_semantics_per_sample():
    batch = _gradient_batch(256)
    torch.manual_seed(2)
    flip = AugmentConfig(rotation=0, hflip=True, translate=0, brightness=0, contrast=0,
                         crop_scale=1.0)  # fmt: skip
    flipped = BatchAugmentation(flip)(batch)
    mirrored = (flipped[:, 0, 0, 0] > flipped[:, 0, 0, -1]).float().mean()
    assert 0.35 < mirrored < 0.65  # p = 0.5, drawn per image
    bright = AugmentConfig(rotation=0, hflip=False, translate=0, brightness=0.2, contrast=0,
                           crop_scale=1.0)  # fmt: skip
    ratio = BatchAugmentation(bright)(batch).mean((1, 2, 3)) / batch.float().mean()
    assert ratio.min() > 0.79 and ratio.max() < 1.21  # factor in [0.8, 1.2] ...
    assert ratio.std() > 0.05  # ... drawn for each image, not once per batch


def _one_pass(image: torch.Tensor, box: tuple[int, int, int, int], flip: bool, degrees: float,
              shift: tuple[float, float]) -> torch.Tensor:  # fmt: skip
    """pneumo's single resampling, from parameters in torchvision's pixel units."""
    side = image.shape[-1]
    top, left, height, width = box
    crop = torch.tensor([[(2 * left + width) / side - 1, (2 * top + height) / side - 1,
                          width / side, height / side]])  # fmt: skip
    theta = affine_theta(crop, torch.tensor([-1.0 if flip else 1.0]),
                         torch.tensor([math.radians(degrees)]),
                         torch.tensor([shift]) * 2 / side)  # fmt: skip
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _one_after_another(image, box, flip, degrees, shift) -> torch.Tensor:
    """The same transforms applied one after another by torchvision."""
    side = image.shape[-1]
    out = TF.resized_crop(image, *box, [side, side], antialias=False)
    out = TF.horizontal_flip(out) if flip else out
    out = TF.rotate(out, degrees, interpolation=InterpolationMode.BILINEAR)
    return TF.affine(out, angle=0.0, translate=list(shift), scale=1.0, shear=[0.0, 0.0],
                     interpolation=InterpolationMode.BILINEAR)  # fmt: skip


@pytest.mark.parametrize(
    "box, flip, degrees, shift",
    [
        ((8, 16, 40, 32), False, 0.0, (0.0, 0.0)),
        ((8, 16, 40, 32), True, 0.0, (0.0, 0.0)),
        ((0, 0, 64, 64), False, 30.0, (0.0, 0.0)),
        ((0, 0, 64, 64), False, 0.0, (6.0, -10.0)),
        ((8, 16, 40, 32), True, 25.0, (5.0, -7.0)),
        ((10, 4, 30, 50), True, -40.0, (-8.0, 3.0)),
    ],
)
def test_one_affine_pass_equals_the_transforms_one_after_another(box, flip, degrees, shift):
    rows, columns = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64),
                                   indexing="ij")  # fmt: skip
    smooth = (torch.sin(6 * columns) * torch.cos(4 * rows) + 0.3 * columns)[None, None]
    ours, theirs = (f(smooth, box, flip, degrees, shift) for f in (_one_pass, _one_after_another))
    ones = torch.ones_like(smooth)
    inside = (_one_pass(ones, box, flip, degrees, shift) > 0.999) & (
        _one_after_another(ones, box, flip, degrees, shift) > 0.999
    )
    assert inside.float().mean() > 0.3
    # one interpolation instead of up to four: close, not equal (the image spans 2.2)
    assert (ours - theirs)[inside].abs().max() < 0.05


def test_drawn_rotation_and_shift_cover_the_configured_ranges():
    torch.manual_seed(4)
    config = AugmentConfig(rotation=15, hflip=False, translate=0.1, brightness=0, contrast=0,
                           crop_scale=1.0)  # fmt: skip
    theta = BatchAugmentation(config).draw(4096)[:, :6].view(-1, 2, 3)
    degrees = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    assert 14.5 < degrees.abs().max() <= 15.0 + 1e-4
    shift = torch.linalg.solve(theta[:, :, :2], -theta[:, :, 2:]).squeeze(-1)  # output of 0
    in_pixels = shift * 224 / 2  # ±0.1 of a 224 px side is ±22.4 px
    assert 22.0 < in_pixels.abs().max() <= 22.4 + 1e-3


@pytest.mark.parametrize("crop_scale", [0.5, 0.9])
def test_the_crop_keeps_its_area_and_aspect_ratio_inside_the_image(crop_scale):
    torch.manual_seed(3)
    crop = AugmentConfig(rotation=0, hflip=False, translate=0, brightness=0, contrast=0,
                         crop_scale=crop_scale)  # fmt: skip
    theta = BatchAugmentation(crop).draw(4096)[:, :6].view(-1, 2, 3)
    half_w, half_h = theta[:, 0, 0], theta[:, 1, 1]
    assert (theta[:, 0, 2].abs() + half_w <= 1 + 1e-6).all()  # box inside: |centre| + half <= 1
    assert (theta[:, 1, 2].abs() + half_h <= 1 + 1e-6).all()
    area = half_w * half_h
    assert area.min() >= crop_scale - 1e-6 and area.max() <= 1.0 + 1e-6
    assert abs(area.mean().item() - (1 + crop_scale) / 2) < 0.01  # uniform in crop_scale..1
    ratio = half_w / half_h
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5


def test_balanced_sampler_shards_one_draw_between_processes():
    targets = np.array([0] * 30 + [1] * 90)
    single = BalancedSampler(targets, seed=5)
    shards = [BalancedSampler(targets, seed=5, rank=r, world=2) for r in range(2)]
    for sampler in (single, *shards):
        sampler.set_epoch(3)
    draws = list(single)
    assert sorted(draws) == sorted(list(shards[0]) + list(shards[1]))
    assert list(shards[0]) == draws[0::2] and list(shards[1]) == draws[1::2]
    assert abs(np.mean(targets[draws]) - 0.5) < 0.15  # classes drawn equally often
    single.set_epoch(4)
    assert list(single) != draws


def test_unbalanced_training_shuffles_anew_each_epoch():
    sampler = train_sampler(np.zeros(50, int), seed=1, balanced=False)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert sorted(first) == list(range(50)) and list(sampler) != first


def _numbered_split(rows: int) -> CachedSplit:
    """Rows whose pixels all hold the row's number, and alternating targets."""
    images = np.repeat(np.arange(rows, dtype=np.uint8), 15).reshape(rows, 3, 5)
    targets = np.arange(rows) % 2
    return CachedSplit(images, targets, pd.DataFrame({"index": range(rows)}))


@pytest.mark.parametrize("threads", [0, 3])
def test_the_cache_loader_yields_the_sampler_batches_in_order(threads):
    split = _numbered_split(50)
    sampler = train_sampler(split.targets, seed=2, balanced=True)
    loader = CacheLoader(split, batch_size=8, indices=sampler, threads=threads)
    assert len(loader) == 7
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        batches = list(loader)
        assert [len(pixels) for pixels, _ in batches] == [8] * 6 + [2]  # the last one short
        pixels = torch.cat([p for p, _ in batches])
        targets = torch.cat([t for _, t in batches])
        assert pixels.dtype == torch.uint8 and pixels.shape[1:] == (1, 3, 5)
        assert pixels[:, 0, 0, 0].tolist() == drawn  # each row where the sampler put it
        assert (pixels == pixels[:, :, :1, :1]).all()
        assert targets.dtype == torch.float32 and targets.tolist() == [i % 2 for i in drawn]


def test_the_cache_loader_reads_every_row_in_order_by_default():
    loader = CacheLoader(_numbered_split(10), batch_size=4, threads=2)
    assert [p[:, 0, 0, 0].tolist() for p, _ in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_the_cache_is_mapped_read_only(tiny_project):
    """A writable private map would reserve the file's size in memory: a cache larger than
    RAM plus swap would not open."""
    split = CachedSplit.load(tiny_project / "data/processed", "train")
    assert isinstance(split.images, np.memmap) and not split.images.flags.writeable
    pixels, _ = next(iter(CacheLoader(split, batch_size=4, threads=1)))
    assert torch.equal(pixels[:, 0], torch.from_numpy(np.array(split.images[:4])))


def test_the_cache_loader_stops_its_threads_and_passes_on_read_errors():
    loader = CacheLoader(_numbered_split(40), batch_size=4, threads=2)
    for _ in loader:
        break  # a consumer that stops early, as training stopped by an error does
    assert not [t for t in threading.enumerate() if t.name.startswith("pneumo-loader")]
    broken = CacheLoader(_numbered_split(40), batch_size=4, indices=[0, 1, 2, 99], threads=2)
    with pytest.raises(IndexError):
        list(broken)
