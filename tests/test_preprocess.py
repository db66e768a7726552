"""Stage `preprocess`: decoding, validation, de-duplication, patient-grouped splits, cache."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pneumo.config import DataConfig
from pneumo.core.images import ImageDecodeError, decode_grayscale, fit_square
from pneumo.stages.fetch import fetch
from pneumo.stages.preprocess import (
    PreprocessError,
    deduplicate,
    preprocess,
    split_by_patient,
    write_array,
)
from tests.conftest import (
    jpeg_bytes,
    kaggle_files,
    run_cli,
    write_tree,
)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


GRADIENT = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64x64, 0..252


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(GRADIENT, "L"),
        Image.fromarray(GRADIENT, "L").convert("RGB"),
        Image.fromarray(GRADIENT, "L").convert("RGBA"),
        Image.fromarray(GRADIENT, "L").convert("P"),
        Image.fromarray(GRADIENT, "L").convert("LA"),
    ],
    ids=["L", "RGB", "RGBA", "P", "LA"],
)
def test_every_image_mode_decodes_to_the_same_gray(image):
    pixels = decode_grayscale(_encode(image, "PNG"))
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 64)
    assert np.abs(pixels.astype(int) - GRADIENT).max() <= 1


def test_sixteen_bit_images_are_rescaled_from_their_own_range():
    deep = (GRADIENT.astype(np.uint16) * 16).astype(np.uint16)  # a 12-bit radiograph
    pixels = decode_grayscale(_encode(Image.fromarray(deep), "PNG"))
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.all(np.diff(pixels[0].astype(int)) >= 0)


def test_transparent_pixels_become_black():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:4, :, 3] = 255  # top half opaque white, bottom transparent
    pixels = decode_grayscale(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert pixels[:4].min() == 255 and pixels[4:].max() == 0


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", jpeg_bytes(3)[:200], b"\x89PNG\r\n\x1a\n" + b"\x00" * 50],
    ids=["empty", "text", "truncated-jpeg", "broken-png"],
)
def test_unreadable_files_raise_a_decode_error(data):
    with pytest.raises(ImageDecodeError):
        decode_grayscale(data)


def test_pad_keeps_the_whole_image_and_crop_keeps_the_centre():
    wide = np.full((20, 40), 200, np.uint8)
    padded = fit_square(wide, 20, "pad")
    assert padded.shape == (20, 20)
    assert padded[0].max() == 0 and padded[10].min() == 200  # black bands above and below
    cropped = fit_square(wide, 20, "crop")
    assert cropped.min() == 200


def _pool(n_patients: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "PNEUMONIA" if rng.random() < 0.75 else "NORMAL"
        for i in range(int(rng.integers(1, 4))):
            rows.append(
                {
                    "path": f"train/{label}/{p}_{i}",
                    "split": "train",
                    "label": label,
                    "patient": f"p{p}",
                    "sha256": f"{p}-{i}",
                }
            )
    return pd.DataFrame(rows)


def test_split_is_grouped_by_patient_and_stratified():
    pool = _pool()
    train, val = split_by_patient(pool, val_fraction=0.2, seed=1)
    assert set(train.patient).isdisjoint(val.patient)
    assert len(train) + len(val) == len(pool)
    assert 0.15 < len(val) / len(pool) < 0.25
    sick = (pool.label == "PNEUMONIA").mean()
    assert abs((val.label == "PNEUMONIA").mean() - sick) < 0.05
    again_train, _ = split_by_patient(pool, val_fraction=0.2, seed=1)
    assert again_train.index.equals(train.index)


def test_too_few_patients_for_the_split():
    with pytest.raises(PreprocessError, match="too few"):
        split_by_patient(_pool(n_patients=3), val_fraction=0.2, seed=0)


def test_deduplicate_removes_pool_copies_of_test_and_repeats():
    manifest = pd.DataFrame(
        [
            {"path": "test/N/a", "split": "test", "patient": "t1", "sha256": "A"},
            {"path": "test/N/a2", "split": "test", "patient": "t1", "sha256": "A"},
            {"path": "train/N/b", "split": "train", "patient": "p1", "sha256": "A"},
            {"path": "train/N/c", "split": "train", "patient": "t1", "sha256": "C"},
            {"path": "train/N/d", "split": "train", "patient": "p2", "sha256": "D"},
            {"path": "val/N/e", "split": "val", "patient": "p3", "sha256": "D"},
            {"path": "train/N/f", "split": "train", "patient": "p4", "sha256": "F"},
        ]
    )
    kept, counts = deduplicate(manifest)
    assert sorted(kept.path) == ["test/N/a", "test/N/a2", "train/N/d", "train/N/f"]
    assert counts == {
        "pool_identical_to_test": 1,
        "pool_of_test_patients": 1,
        "pool_identical_within_pool": 1,
    }


def _raw(tmp_path, extra: dict[str, bytes] | None = None):
    files = kaggle_files(patients=30) | (extra or {})
    fetch(
        DataConfig(source="local", local_path=str(write_tree(tmp_path / "src", files))),
        tmp_path / "raw",
        seed=0,
    )
    return tmp_path / "raw", len(files)


def test_cache_report_and_excluded_files(tmp_path):
    bad = {
        "chest_xray/train/NORMAL/IM-9001-0001.jpeg": jpeg_bytes(9)[:150],
        "chest_xray/train/PNEUMONIA/person9002_virus_1.jpeg": b"<html>rate limited</html>",
    }
    copy = {"chest_xray/train/NORMAL/IM-9003-0001.jpeg": jpeg_bytes(2)}  # same bytes as another
    raw, n_files = _raw(tmp_path, bad | copy)
    config = DataConfig(image_size=32, val_fraction=0.2, max_bad_fraction=0.05)
    report = preprocess(config, raw, tmp_path / "processed", seed=0, workers=1)

    assert {e["path"] for e in report["excluded"]} == {
        "train/NORMAL/IM-9001-0001.jpeg",
        "train/PNEUMONIA/person9002_virus_1.jpeg",
    }
    assert all(e["reason"] and e["kind"] == "unreadable" for e in report["excluded"])
    assert report["excluded_counts"] == {"unreadable": 2}
    assert report["duplicates_removed"]["pool_identical_within_pool"] == 1
    assert report["cached_images"] == n_files - 3
    assert all(n == 0 for part in report["overlap"].values() for n in part.values())
    out = tmp_path / "processed"
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "samples.png").stat().st_size > 1000
    manifest = pd.read_csv(out / "manifest.csv")
    for split in ("train", "val", "test"):
        images = np.load(out / f"{split}_images.npy")
        rows = manifest[manifest.split == split]
        assert images.shape == (len(rows), 32, 32) and images.dtype == np.uint8
        assert list(rows["index"]) == list(range(len(rows)))
    assert (manifest[manifest.split == "test"].source_split == "test").all()
    assert set(manifest.target) == {0, 1}


def test_tiny_and_constant_images_are_excluded_with_their_reason(tmp_path):
    tiny = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 90), np.uint8))
    unusable = {
        "chest_xray/train/NORMAL/IM-9101-0001.jpeg": _encode(tiny, "JPEG"),
        "chest_xray/train/NORMAL/IM-9102-0001.png": _encode(Image.new("L", (80, 80), 0), "PNG"),
        "chest_xray/test/PNEUMONIA/person9103_virus_1.png": _encode(
            Image.new("RGB", (300, 200), (128, 128, 128)), "PNG"
        ),
    }
    raw, n_files = _raw(tmp_path, unusable)
    config = DataConfig(image_size=32, val_fraction=0.2, max_bad_fraction=0.05)
    report = preprocess(config, raw, tmp_path / "processed", seed=0, workers=1)
    reasons = {e["path"]: (e["kind"], e["reason"]) for e in report["excluded"]}
    assert reasons == {
        "train/NORMAL/IM-9101-0001.jpeg": ("too_small", "90x40 px, below data.min_image_side=64"),
        "train/NORMAL/IM-9102-0001.png": ("constant", "every pixel is 0: no image content"),
        "test/PNEUMONIA/person9103_virus_1.png": (
            "constant",
            "every pixel is 128: no image content",
        ),
    }
    assert report["excluded_counts"] == {"constant": 2, "too_small": 1}
    assert report["cached_images"] == n_files - 3


def test_too_many_bad_files_fail_and_write_nothing(tmp_path):
    bad = {f"chest_xray/train/NORMAL/IM-95{i:02d}-0001.jpeg": b"junk" for i in range(10)}
    raw, _ = _raw(tmp_path, bad)
    with pytest.raises(
        PreprocessError, match=r"10 of .* are excluded \(unreadable: 10\).*max_bad_fraction"
    ):
        preprocess(
            DataConfig(image_size=32, max_bad_fraction=0.01),
            raw,
            tmp_path / "processed",
            seed=0,
            workers=1,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "src"]


def _tree_digests(folder) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_fetch_and_preprocess_twice_give_byte_identical_outputs(in_tmp):
    """Nothing in data/processed may depend on the run: no addresses, times or orderings."""
    corrupt = {
        "chest_xray/train/NORMAL/IM-9001-0001.jpeg": b"<html>rate limited</html>",
        "chest_xray/train/PNEUMONIA/person9002_virus_1.jpeg": jpeg_bytes(9)[:200],
    }
    source = write_tree(in_tmp / "src", kaggle_files(patients=30) | corrupt)
    params = {
        "data": {"source": "local", "local_path": str(source), "max_bad_fraction": 0.05},
    }
    digests = []
    for _ in range(2):
        for command in (("fetch",), ("preprocess", "--workers", "1")):
            result = run_cli(*command, params=params)
            assert result.exit_code == 0, result.output
        digests.append(_tree_digests(in_tmp / "data/processed"))
    report = json.loads((in_tmp / "data/processed/report.json").read_text())
    assert len(report["excluded"]) == 2
    assert "report.json" in digests[0] and "train_images.npy" in digests[0]
    assert digests[0] == digests[1]


# --- at scale: memory that stays flat, arrays written row by row ---------------------------------


def _preprocess_peak_mib(project: Path, images: int) -> float:
    """Peak RSS of the process that runs `pneumo preprocess` (decoding runs in a worker),
    measured as the scale benchmark measures it, on the benchmark's generated images."""
    from scripts.benchmark_scale import run_stage, write_folder

    project.mkdir()
    source = write_folder(project / "source", images)
    params = {
        "data": {"source": "local", "local_path": str(source), "image_size": 256},
        "tracking": {"experiment": "tests"},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage(project, "fetch")
    _, peak = run_stage(project, "preprocess", "--workers", "1")
    counts = json.loads((project / "data/processed/report.json").read_text())["cached_images"]
    assert counts == images
    return peak


@pytest.mark.slow
@pytest.mark.scenario
def test_preprocess_memory_does_not_grow_with_the_number_of_images(tmp_path):
    small = _preprocess_peak_mib(tmp_path / "small", 400)
    large = _preprocess_peak_mib(tmp_path / "large", 1600)
    # 1,200 more images of 256x256 are 79 MB of pixels: holding them (twice, as the
    # previous cache writer did) would add well over 100 MB.
    assert large - small < 30, (small, large)


def test_cache_arrays_are_written_row_by_row_as_numpy_would(tmp_path):
    rows = np.random.default_rng(0).integers(0, 256, (10, 8, 8), dtype=np.uint8)
    rows.tofile(tmp_path / "rows.u8")
    picks = np.array([7, 2, 2, 9])
    write_array(tmp_path / "rows.u8", picks, 8, tmp_path / "picked.npy")
    np.save(tmp_path / "reference.npy", rows[picks])
    assert (tmp_path / "picked.npy").read_bytes() == (tmp_path / "reference.npy").read_bytes()
