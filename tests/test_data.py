"""Reading the preprocess cache: a missing or inconsistent cache says how to rebuild it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pneumo.core.data import CachedSplit, CacheError


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
