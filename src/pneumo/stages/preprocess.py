"""Stage `preprocess`: validate, deduplicate, split by patient and cache data/raw as arrays.

* The official test split is kept as it is. The official train and val splits are pooled and
  re-split into train/val grouped by patient and stratified by label, because the official
  val split has only 16 images and a patient's images must never sit on both sides.
* Unreadable images, images whose shorter side is below ``data.min_image_side`` and images
  of one flat colour are excluded and listed with their reason; together they may make up
  at most ``data.max_bad_fraction`` of the raw images. A DICOM file that needs a package
  which is not installed (pydicom, or a decoder for its compression) stops the run instead.
* Byte-identical copies are removed from the pool (keeping one), as are pool images that are
  byte-identical to a test image or belong to a test patient.
* Each split is stored as one ``(N, size, size)`` uint8 array, so training reads pixels
  without decoding a JPEG per epoch; ``manifest.csv`` maps rows back to files and patients.
  Decoded rows go to disk as they come and the arrays are assembled row by row, so memory
  does not grow with the data set (training memory-maps the arrays).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from pneumo import paths
from pneumo.config import CLASS_NAMES, DataConfig, val_folds
from pneumo.core.images import (
    ImageDecodeError,
    MissingDicomSupport,
    ResizeMethod,
    decode_grayscale,
    fit_square,
)
from pneumo.errors import UserError
from pneumo.figures import png_figure
from pneumo.files import staged_dir
from pneumo.paths import SPLITS

log = logging.getLogger(__name__)


class PreprocessError(UserError):
    """The raw data cannot be turned into a trustworthy cache; the message says why."""


Exclusion = tuple[str, str]  # (kind, reason): kind is unreadable, too_small or constant


def _prepare_file(
    path: Path, size: int, method: ResizeMethod, min_side: int
) -> np.ndarray | Exclusion:
    """Cache pixels, or why the file cannot teach anything: unreadable, tiny or blank."""
    try:
        pixels = decode_grayscale(path.read_bytes())
    except MissingDicomSupport as exc:
        raise PreprocessError(f"{path}: {exc}") from exc  # an install fixes it: do not exclude
    except (ImageDecodeError, OSError) as exc:
        return "unreadable", str(exc)
    height, width = pixels.shape
    if min(height, width) < min_side:
        return "too_small", f"{width}x{height} px, below data.min_image_side={min_side}"
    if pixels.min() == pixels.max():
        return "constant", f"every pixel is {pixels.min()}: no image content"
    return fit_square(pixels, size, method)


DECODE_FILES_PER_WORKER = 64  # in flight at once: bounds memory whatever the data set size


def decode_all(
    raw_dir: Path, paths: list[str], config: DataConfig, workers: int, rows_file: Path
) -> dict[str, Exclusion]:
    """Decode every file in parallel into ``rows_file``, one ``size * size`` byte row per
    path in order (zeros for an excluded file); returns why each excluded file was excluded.

    Rows go to disk as they come, a window of files per worker at a time, so memory stays
    flat however many images there are.
    """
    work = partial(
        _prepare_file,
        size=config.image_size,
        method=config.resize,
        min_side=config.min_image_side,
    )
    blank = np.zeros((config.image_size, config.image_size), np.uint8)
    excluded: dict[str, Exclusion] = {}
    with (
        ProcessPoolExecutor(max_workers=workers) as pool,
        rows_file.open("wb") as rows,
        tqdm(total=len(paths), desc="decode", mininterval=2.0) as progress,
    ):
        step = DECODE_FILES_PER_WORKER * workers
        for start in range(0, len(paths), step):
            window = paths[start : start + step]
            results = pool.map(work, [raw_dir / p for p in window], chunksize=16)
            for path, result in zip(window, results, strict=True):
                if isinstance(result, tuple):
                    excluded[path] = result
                rows.write((blank if isinstance(result, tuple) else result).tobytes())
            progress.update(len(window))
    return excluded


def write_array(rows_file: Path, rows: np.ndarray, size: int, target: Path) -> None:
    """``rows`` of ``rows_file`` as a ``(len(rows), size, size)`` uint8 .npy file, copied one
    row at a time (the header is the one ``np.save`` writes, so readers see a plain array)."""
    row_bytes = size * size
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(rows), size, size)}
    with rows_file.open("rb") as source, target.open("wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        for row in rows:
            out.write(os.pread(source.fileno(), row_bytes, int(row) * row_bytes))


def deduplicate(manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop pool rows that duplicate a test image, a test patient or another pool image."""
    test = manifest[manifest.split == "test"]
    pool = manifest[manifest.split != "test"].sort_values("path")
    in_test_bytes = pool.sha256.isin(set(test.sha256))
    of_test_patient = pool.patient.isin(set(test.patient)) & ~in_test_bytes
    repeated = pool.sha256.duplicated(keep="first") & ~in_test_bytes & ~of_test_patient
    counts = {
        "pool_identical_to_test": int(in_test_bytes.sum()),
        "pool_of_test_patients": int(of_test_patient.sum()),
        "pool_identical_within_pool": int(repeated.sum()),
    }
    kept = pool[~(in_test_bytes | of_test_patient | repeated)]
    return pd.concat([kept, test]), counts


def split_by_patient(
    pool: pd.DataFrame, val_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patient-grouped, label-stratified train/val split of the pooled rows."""
    n_splits = val_folds(val_fraction)
    if pool.patient.nunique() < n_splits:
        raise PreprocessError(
            f"only {pool.patient.nunique()} patients in train+val: too few for "
            f"data.val_fraction={val_fraction}"
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(folds.split(pool, pool.label, groups=pool.patient))
    return pool.iloc[train_idx], pool.iloc[val_idx]


def overlap_check(splits: dict[str, pd.DataFrame]) -> dict[str, dict[str, int]]:
    shared: dict[str, dict[str, int]] = {"patients": {}, "sha256": {}}
    for (a, frame_a), (b, frame_b) in combinations(splits.items(), 2):
        for column, key in (("patient", "patients"), ("sha256", "sha256")):
            shared[key][f"{a}/{b}"] = len(set(frame_a[column]) & set(frame_b[column]))
    return shared


def preprocess(
    config: DataConfig, raw_dir: Path, out_dir: Path, seed: int, workers: int = 2
) -> dict:
    """Build the cache in ``out_dir`` from ``raw_dir``; returns the report."""
    manifest = pd.read_csv(raw_dir / paths.MANIFEST)  # row i of the decoded rows is line i
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".decoded-", dir=out_dir.parent) as tmp:
        rows_file = Path(tmp) / "rows.u8"
        exclusions = decode_all(raw_dir, manifest.path.tolist(), config, workers, rows_file)
        return _build_cache(config, manifest, exclusions, rows_file, out_dir, seed)


def _build_cache(
    config: DataConfig,
    manifest: pd.DataFrame,
    exclusions: dict[str, Exclusion],
    rows_file: Path,
    out_dir: Path,
    seed: int,
) -> dict:
    """Check exclusions, de-duplicate, split, and write the cache from the decoded rows."""
    bad_fraction = len(exclusions) / max(len(manifest), 1)
    excluded = [
        {"path": path, "kind": kind, "reason": reason}
        for path, (kind, reason) in sorted(exclusions.items())
    ]
    if bad_fraction > config.max_bad_fraction:
        kinds = Counter(kind for kind, _ in exclusions.values())
        listing = "\n  ".join(f"{e['path']}: {e['kind']}: {e['reason']}" for e in excluded[:10])
        raise PreprocessError(
            f"{len(exclusions)} of {len(manifest)} images ({bad_fraction:.1%}) are excluded "
            f"({', '.join(f'{kind}: {n}' for kind, n in sorted(kinds.items()))}), more than "
            f"data.max_bad_fraction={config.max_bad_fraction}:\n  {listing}"
        )
    readable = manifest[~manifest.path.isin(exclusions)]
    deduped, duplicates = deduplicate(readable)
    train, val = split_by_patient(deduped[deduped.split != "test"], config.val_fraction, seed)
    splits = {"train": train, "val": val, "test": deduped[deduped.split == "test"]}
    overlap = overlap_check(splits)
    if any(n for counts in overlap.values() for n in counts.values()):
        raise PreprocessError(f"splits overlap after de-duplication: {overlap}")

    with staged_dir(out_dir) as staging:
        rows = []
        for name in SPLITS:
            frame = splits[name].sort_values("path")
            write_array(
                rows_file, frame.index.to_numpy(), config.image_size,
                staging / paths.cache_images(name),
            )  # fmt: skip
            frame = frame.reset_index(drop=True)
            rows.append(
                frame.assign(
                    source_split=frame.split,
                    split=name,
                    index=np.arange(len(frame)),
                    target=(frame.label == CLASS_NAMES[1]).astype(int),
                )
            )
        cache_manifest = pd.concat(rows, ignore_index=True)
        cache_manifest.to_csv(staging / paths.MANIFEST, index=False)
        report = _report(cache_manifest, len(manifest), excluded, duplicates, overlap, config)
        (staging / paths.PREPROCESS_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        _sample_grid(cache_manifest, staging, staging / paths.SAMPLES_PNG, seed)
    log.info("cache written to %s: %s", out_dir, report["counts"])
    return report


def _report(
    cache: pd.DataFrame,
    n_raw: int,
    excluded: list[dict],
    duplicates: dict[str, int],
    overlap: dict,
    config: DataConfig,
) -> dict:
    counts = {
        split: {label: int((frame.label == label).sum()) for label in CLASS_NAMES}
        for split, frame in cache.groupby("split", sort=False)
    }
    return {
        "image_size": config.image_size,
        "resize": config.resize,
        "raw_images": n_raw,
        "cached_images": len(cache),
        "counts": counts,
        "pneumonia_fraction": {
            split: round(c["PNEUMONIA"] / max(sum(c.values()), 1), 4) for split, c in counts.items()
        },
        "patients": {split: int(f.patient.nunique()) for split, f in cache.groupby("split")},
        "excluded_counts": dict(sorted(Counter(e["kind"] for e in excluded).items())),
        "excluded": excluded,
        "duplicates_removed": duplicates,
        "overlap": overlap,
    }


def _sample_grid(cache: pd.DataFrame, cache_dir: Path, png: Path, seed: int, per_class: int = 8):
    """A picture of random training images per class: look at the data before trusting it."""
    images = np.load(cache_dir / paths.cache_images("train"), mmap_mode="r")
    train = cache[cache.split == "train"]
    rng = np.random.default_rng(seed)
    grid = png_figure(png, 2, per_class, figsize=(per_class * 1.6, 3.8), squeeze=False)
    with grid as (fig, axes):
        for row, label in enumerate(CLASS_NAMES):
            rows = train[train.label == label]
            picks = rng.choice(len(rows), size=min(per_class, len(rows)), replace=False)
            for col, ax in enumerate(axes[row]):
                ax.axis("off")
                if col < len(picks):
                    item = rows.iloc[picks[col]]
                    ax.imshow(images[item["index"]], cmap="gray", vmin=0, vmax=255)
                    ax.set_title(f"{label}\n{item.patient}", fontsize=7)
        fig.suptitle("Training images from the preprocess cache", fontsize=10)
