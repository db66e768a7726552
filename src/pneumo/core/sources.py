"""Where images come from: labelled entries read lazily from the generated sample, a folder,
a ``.zip`` (refused when an entry would land outside the target or exceeds the limits,
checked on the central directory and again on the bytes read) or a CSV of ``path,label``.

The `fetch` stage writes the training data from them (Kaggle layout, split folders); the
`evaluate` stage reads external sets with them (``NORMAL``/``PNEUMONIA`` folders at any depth,
every split pooled).
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image

from pneumo.config import (
    CLASS_NAMES,
    ExternalSample,
    ExternalSet,
    SampleConfig,
    SplitCounts,
    ZipLimits,
)
from pneumo.core.images import IMAGE_SUFFIXES
from pneumo.core.phantoms import AS_TRAINED, Acquisition, phantom, phantom_with_lesion
from pneumo.errors import UserError
from pneumo.paths import SPLITS

log = logging.getLogger(__name__)

IGNORED_NAMES = {".DS_Store", "Thumbs.db"}
MB = 1 << 20
RATIO_FLOOR_BYTES = MB  # smaller entries cannot inflate far enough to matter

# personN counts separately for bacteria and virus (scripts/patient_keys.py shows it), so
# person12_bacteria and person12_virus are two patients.
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+_(?:bacteria|virus))_\d+", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE),
)


class FetchError(UserError):
    """The source cannot be turned into data/raw; the message says what to do."""


@dataclass(frozen=True)
class Entry:
    """One image of the source: where it sits in the Kaggle layout and how to read it."""

    split: str
    label: str
    name: str
    read: Callable[[], bytes]


def patient_id(filename: str) -> str:
    """Patient id from a Kaggle file name; unknown patterns fall back to the file stem.

    ``person12_virus_5`` → ``person12_virus``, ``IM-0115-0001`` → ``IM-0115``,
    ``NORMAL2-IM-0427-0001`` → ``NORMAL2-IM-0427``.
    """
    stem = PurePosixPath(filename).stem
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem


# --- sources ------------------------------------------------------------------------------


def sample_entries(
    config: SampleConfig, seed: int, acquisition: Acquisition = AS_TRAINED
) -> Iterator[Entry]:
    """Generated images with Kaggle-style names; some patients have several images."""
    rng = np.random.default_rng(seed)
    counters = Counter[str]()
    index = 0
    for split in SPLITS:
        counts = getattr(config, split)
        for label, count in ((CLASS_NAMES[0], counts.normal), (CLASS_NAMES[1], counts.pneumonia)):
            made = 0
            while made < count:
                images = min(int(rng.integers(1, config.max_images_per_patient + 1)), count - made)
                counters[label] += 1
                patient = counters[label]
                kind = "bacteria" if rng.random() < 0.65 else "virus"
                for image_no in range(1, images + 1):
                    if label == "NORMAL":
                        name = f"IM-{patient:04d}-{image_no:04d}.jpeg"
                    else:
                        counters["pneumonia_image"] += 1
                        name = f"person{patient}_{kind}_{counters['pneumonia_image']}.jpeg"
                    encode = _encoder(seed, index, config.image_size, label, acquisition)
                    yield Entry(split, label, name, encode)
                    index += 1
                made += images


def sample_lesion_masks(config: SampleConfig, seed: int, split: str) -> dict[str, np.ndarray]:
    """Where the signs lie in each PNEUMONIA image of ``split`` of the generated sample, as
    boolean masks at the generated size, by path under data/raw
    (``test/PNEUMONIA/person3_bacteria_7.jpeg``): the ground truth a heatmap should point into.
    Image ``index`` is the entry's position in :func:`sample_entries`, as when it was written.
    """
    return {
        f"{entry.split}/{entry.label}/{entry.name}": phantom_with_lesion(
            seed, index, config.image_size, pneumonia=True
        )[1]
        for index, entry in enumerate(sample_entries(config, seed))
        if entry.split == split and entry.label == CLASS_NAMES[1]
    }


def _encoder(
    seed: int, index: int, size: int, label: str, acquisition: Acquisition
) -> Callable[[], bytes]:
    def encode() -> bytes:
        pixels = phantom(seed, index, size, label == "PNEUMONIA", acquisition)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=92)
        return buffer.getvalue()

    return encode


def _image_parts(files: list[str]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Image files and their path parts, without macOS debris."""
    for rel in files:
        parts = PurePosixPath(rel).parts
        if "__MACOSX" in parts or parts[-1] in IGNORED_NAMES or parts[-1].startswith("._"):
            continue
        if PurePosixPath(rel).suffix.lower() in IMAGE_SUFFIXES:
            yield rel, parts


def _kaggle_layout(files: list[str]) -> list[tuple[str, str, str]]:
    """Pick ``<root>/{split}/{CLASS}/<image>`` files; with nested copies keep the shallowest."""
    by_root: dict[tuple[str, ...], list[tuple[str, str, str]]] = {}
    for rel, parts in _image_parts(files):
        if len(parts) < 3:
            continue
        split, label = parts[-3].lower(), parts[-2].upper()
        if split in SPLITS and label in CLASS_NAMES:
            by_root.setdefault(parts[:-3], []).append((rel, split, label))
    if not by_root:
        top = sorted({PurePosixPath(f).parts[0] for f in files})[:20]
        raise FetchError(
            "no images in the Kaggle layout chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/; "
            f"found {len(files)} files, top-level entries: {top}"
        )
    root = min(by_root, key=len)
    skipped = sum(len(v) for k, v in by_root.items() if k != root)
    if skipped:
        log.info("using %s/, ignoring %d files in nested copies", "/".join(root), skipped)
    found = {(split, label) for _, split, label in by_root[root]}
    missing = [f"{s}/{c}" for s in ("train", "test") for c in CLASS_NAMES if (s, c) not in found]
    if missing:
        raise FetchError(f"the Kaggle layout under {'/'.join(root) or '.'} lacks {missing}")
    return sorted(by_root[root])


def local_entries(path: Path, limits: ZipLimits) -> list[Entry]:
    if not path.exists():
        raise FetchError(f"data.local_path {str(path)!r} does not exist")
    if path.is_dir():
        return folder_entries(path)
    if zipfile.is_zipfile(path):
        return zip_entries(path, limits)
    with path.open("rb") as handle:
        looks_like_zip = handle.read(4) == b"PK\x03\x04"
    if looks_like_zip or path.suffix.lower() == ".zip":
        raise _damaged(path, "its central directory is missing (truncated download?)")
    raise FetchError(f"data.local_path {str(path)!r} is neither a folder nor a .zip archive")


Layout = Callable[[list[str]], list[tuple[str, str, str]]]


def folder_entries(root: Path, layout: Layout = _kaggle_layout) -> list[Entry]:
    found = sorted(root.rglob("*"))
    links = [p.relative_to(root).as_posix() for p in found if p.is_symlink()]
    if links:
        raise FetchError(
            f"{root} holds {len(links)} symbolic links, which fetch does not follow (they may "
            f"point outside the folder): {links[:5]}; copy the files in instead"
        )
    files = {p.relative_to(root).as_posix(): p for p in found if p.is_file()}
    return [
        Entry(split, label, PurePosixPath(rel).name, files[rel].read_bytes)
        for rel, split, label in layout(list(files))
    ]


def zip_entries(archive: Path, limits: ZipLimits, layout: Layout = _kaggle_layout) -> list[Entry]:
    try:
        # The handle stays open for the readers below; it closes when the last one is dropped.
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _damaged(archive, str(exc)) from exc
    infos = {info.filename: info for info in zf.infolist() if not info.is_dir()}
    unsafe = [name for name in infos if _escapes(name)]
    if unsafe:
        zf.close()
        raise FetchError(
            f"{archive} holds entries that would be written outside the target folder "
            f"(absolute paths or '..'): {unsafe[:5]}; refusing the whole archive"
        )
    try:
        check_declared_sizes(list(infos.values()), limits)
    except FetchError as exc:
        zf.close()
        raise FetchError(f"{archive}: {exc}; refusing the whole archive") from None
    budget = ReadBudget(limits)
    return [
        Entry(split, label, PurePosixPath(rel).name, partial(budget.read, archive, zf, infos[rel]))
        for rel, split, label in layout(list(infos))
    ]


def _damaged(archive: Path, detail: str) -> FetchError:
    return FetchError(f"{archive} is a damaged .zip archive ({detail}); download it again")


def _limit_hint(key: str, value: float) -> str:
    return f"data.limits.{key}={value:g} (raise it in params.yaml if you trust the archive)"


def check_declared_sizes(infos: list[zipfile.ZipInfo], limits: ZipLimits) -> None:
    """Refuse an archive whose central directory announces too much, before reading any."""
    for info in infos:
        if info.file_size > limits.max_entry_mb * MB:
            raise FetchError(
                f"entry {info.filename!r} unpacks to {info.file_size / MB:.1f} MB, more than "
                + _limit_hint("max_entry_mb", limits.max_entry_mb)
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= RATIO_FLOOR_BYTES and ratio > limits.max_compression_ratio:
            raise FetchError(
                f"entry {info.filename!r} is compressed {ratio:.0f}:1, more than "
                + _limit_hint("max_compression_ratio", limits.max_compression_ratio)
            )
    total = sum(info.file_size for info in infos)
    if total > limits.max_total_mb * MB:
        raise FetchError(
            f"its entries unpack to {total / MB:.0f} MB, more than "
            + _limit_hint("max_total_mb", limits.max_total_mb)
        )


@dataclass
class ReadBudget:
    """What an archive may still yield, counted on the bytes actually decompressed.

    Declared sizes are checked first (:func:`check_declared_sizes`), but they are only what
    the archive claims: each read stops one byte past what the limits still allow.
    """

    limits: ZipLimits
    used: int = 0

    def read(self, archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
        entry_limit = int(self.limits.max_entry_mb * MB)
        allowed = min(entry_limit, int(self.limits.max_total_mb * MB) - self.used)
        try:
            with zf.open(info) as handle:
                data = handle.read(allowed + 1)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise _damaged(archive, f"entry {info.filename!r}: {exc}") from exc
        except (NotImplementedError, RuntimeError) as exc:  # encrypted, unknown compression
            raise FetchError(
                f"{archive}: entry {info.filename!r} cannot be read ({exc}); repack the images "
                "as a plain, unencrypted .zip"
            ) from exc
        if len(data) > allowed:
            key = "max_entry_mb" if allowed == entry_limit else "max_total_mb"
            raise FetchError(
                f"{archive}: entry {info.filename!r} unpacks to more than "
                + _limit_hint(key, getattr(self.limits, key))
            )
        self.used += len(data)
        return data


def _escapes(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name) is not None


# --- external sets: labelled images from anywhere, all of them unseen --------------------

EXTERNAL_SPLIT = "external"


def _labelled_layout(files: list[str]) -> list[tuple[str, str, str]]:
    """Pick ``<root>/[<split>/]{NORMAL,PNEUMONIA}/<image>`` files, every split pooled; with
    nested copies keep the shallowest root."""
    by_root: dict[tuple[str, ...], list[tuple[str, str, str]]] = {}
    for rel, parts in _image_parts(files):
        if len(parts) < 2 or parts[-2].upper() not in CLASS_NAMES:
            continue
        root = parts[:-3] if len(parts) > 2 and parts[-3].lower() in SPLITS else parts[:-2]
        by_root.setdefault(root, []).append((rel, EXTERNAL_SPLIT, parts[-2].upper()))
    if not by_root:
        top = sorted({PurePosixPath(f).parts[0] for f in files})[:20]
        raise FetchError(
            "no images in NORMAL/ or PNEUMONIA/ folders (at any depth, e.g. "
            f"chest_xray/test/NORMAL/); found {len(files)} files, top-level entries: {top}"
        )
    return sorted(by_root[min(by_root, key=len)])


def labelled_csv_entries(table: Path) -> list[Entry]:
    """The images a CSV of ``path,label`` names (paths relative to the CSV's folder, labels
    NORMAL/PNEUMONIA or 0/1), every one checked before any is read."""
    try:
        frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise FetchError(f"{table} is not a readable CSV: {exc}") from None
    if not {"path", "label"} <= set(frame.columns):
        raise FetchError(f"{table} needs the columns path,label; it has {list(frame.columns)}")
    labels = frame["label"].str.strip().str.upper().replace({"0": "NORMAL", "1": "PNEUMONIA"})
    unknown = sorted(set(labels) - set(CLASS_NAMES))
    if unknown:
        raise FetchError(f"{table}: labels must be NORMAL/PNEUMONIA or 0/1, found {unknown[:5]}")
    files = [table.parent / rel for rel in frame["path"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FetchError(f"{table} names {len(missing)} files that do not exist: {missing[:5]}")
    return [
        Entry(EXTERNAL_SPLIT, label, file.name, file.read_bytes)
        for file, label in zip(files, labels, strict=True)
    ]


def external_entries(spec: ExternalSet, limits: ZipLimits) -> list[Entry]:
    """The labelled images of an external set: generated, a CSV, a folder or a .zip."""
    if spec.sample is not None:
        return sample_external_entries(spec.sample)
    path = Path(spec.path or "")
    if not path.exists():
        raise FetchError(f"external set {spec.name!r}: {str(path)!r} does not exist")
    if path.suffix.lower() == ".csv":
        return labelled_csv_entries(path)
    if path.is_dir():
        return folder_entries(path, _labelled_layout)
    if zipfile.is_zipfile(path):
        return zip_entries(path, limits, _labelled_layout)
    raise FetchError(
        f"external set {spec.name!r}: {str(path)!r} is neither a folder, a .zip nor a .csv"
    )


def sample_external_entries(config: ExternalSample) -> list[Entry]:
    """Phantoms under ``config.acquisition``, named as the Kaggle files are."""
    counts = SplitCounts(normal=config.normal, pneumonia=config.pneumonia)
    sample = SampleConfig(train=counts, val=counts, test=counts, image_size=config.image_size)
    acquisition = Acquisition(**config.acquisition.model_dump())
    return [
        Entry(EXTERNAL_SPLIT, e.label, e.name, e.read)
        for e in sample_entries(sample, config.seed, acquisition)
        if e.split == "test"
    ]
