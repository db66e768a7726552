"""fetch + preprocess on the real dev archive (skipped when ../shared/data lacks it)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import DEV_ARCHIVE, run_cli

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DEV_ARCHIVE.is_file(), reason=f"{DEV_ARCHIVE} not present"),
]

# The archive's README: official train minus moved patients, the official val, and a
# patient-disjoint test carved from the official train split.
EXPECTED_RAW = {
    ("train", "NORMAL"): 1107,
    ("train", "PNEUMONIA"): 3483,
    ("val", "NORMAL"): 8,
    ("val", "PNEUMONIA"): 8,
    ("test", "NORMAL"): 234,
    ("test", "PNEUMONIA"): 392,
}


def test_fetch_and_preprocess_the_dev_archive(in_tmp):
    params = {"data": {"source": "local", "local_path": str(DEV_ARCHIVE), "image_size": 64}}
    assert run_cli("fetch", params=params).exit_code == 0
    raw = pd.read_csv(in_tmp / "data/raw/manifest.csv")
    assert raw.groupby(["split", "label"]).size().to_dict() == EXPECTED_RAW
    assert set(raw["mode"]) <= {"L", "RGB"} and raw.width.min() >= 224

    assert run_cli("preprocess").exit_code == 0
    report = json.loads((in_tmp / "data/processed/report.json").read_text())
    assert report["counts"]["test"] == {"NORMAL": 234, "PNEUMONIA": 392}
    removed = sum(report["duplicates_removed"].values())
    assert report["cached_images"] == len(raw) - len(report["excluded"]) - removed
    # 62 files form 30 byte-identical groups, all within one split: 32 surplus copies, of
    # which the ones in the pooled train+val are removed (test stays untouched).
    assert 0 < report["duplicates_removed"]["pool_identical_within_pool"] <= 32
    # Keyed per category (personN_virus, personN_bacteria), no training patient is a test
    # patient: the archive's test split was carved patient-disjoint, so none is removed.
    assert report["duplicates_removed"]["pool_of_test_patients"] == 0
    assert all(n == 0 for part in report["overlap"].values() for n in part.values())
    pooled = {s: sum(report["counts"][s].values()) for s in ("train", "val")}
    assert 0.1 < pooled["val"] / (pooled["train"] + pooled["val"]) < 0.2
    assert abs(report["pneumonia_fraction"]["val"] - report["pneumonia_fraction"]["train"]) < 0.03
    images = np.load(in_tmp / "data/processed/train_images.npy", mmap_mode="r")
    assert images.shape[1:] == (64, 64) and images.dtype == np.uint8
