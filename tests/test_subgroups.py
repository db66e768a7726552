"""Subgroup metrics: subtypes from Kaggle file names, size bands from the training images, and
the flag for a subgroup the model misses more than its overall numbers say."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pneumo.core import subgroups


@pytest.mark.parametrize(
    ("path", "target", "expected"),
    [
        ("test/PNEUMONIA/person1_bacteria_1.jpeg", 1, "bacterial"),
        ("test/PNEUMONIA/person1650_virus_2853.jpeg", 1, "viral"),
        ("PNEUMONIA/PERSON3_VIRUS_7.JPEG", 1, "viral"),
        ("scans/patient-7.png", 1, "unknown"),
        ("test/NORMAL/IM-0001-0001.jpeg", 0, "normal"),
        ("bacteria_dir/person1_x.jpeg", 1, "unknown"),  # the folder's name does not count
    ],
)
def test_the_subtype_comes_from_the_file_name(path, target, expected):
    assert subgroups.subtype(path, target) == expected


def test_size_bands_are_thirds_of_the_training_sizes():
    train = np.array([1e6] * 10 + [2e6] * 10 + [4e6] * 10)
    edges = subgroups.size_edges(train)
    assert len(edges) == 2 and 1e6 < edges[0] <= 2e6 <= edges[1] < 4e6
    assert subgroups.band_names(edges)[0].startswith("< ")
    assert subgroups.band_names(edges)[-1].startswith(">= ")
    # one size only: a single band
    assert subgroups.size_edges(np.full(9, 16384.0)) == []
    assert subgroups.band_names([]) == ["all sizes"]


def _frame(sizes: list[int], names: list[str], targets: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"path": names, "target": targets, "width": sizes, "height": sizes})


def test_slices_are_ordered_categories_with_sizes_cut_at_the_training_edges():
    manifest = _frame(
        [500, 1500, 3000], ["a/person1_virus_1.jpeg", "IM-1.jpeg", "person2_bacteria_3.jpeg"],
        [1, 0, 1],
    )  # fmt: skip
    groups = subgroups.slices(manifest, [1e6, 4e6])
    assert list(groups.subtype) == ["viral", "normal", "bacterial"]
    names = subgroups.band_names([1e6, 4e6])
    assert list(groups.size_band) == [names[0], names[1], names[2]]
    assert list(groups.size_band.cat.categories) == names


def test_a_subgroup_missed_more_than_overall_is_flagged():
    rng = np.random.default_rng(0)
    # 120 bacterial all found, 40 viral of which 30 missed, 160 NORMAL all right
    names = ["person_bacteria_1.jpeg"] * 120 + ["person_virus_1.jpeg"] * 40 + ["IM.jpeg"] * 160
    y = np.array([1] * 160 + [0] * 160)
    p = np.concatenate([rng.uniform(0.6, 1, 120), rng.uniform(0.6, 1, 10),
                        rng.uniform(0, 0.4, 30), rng.uniform(0, 0.4, 160)])  # fmt: skip
    manifest = _frame([1000] * 320, names, list(y))
    found = subgroups.assess(y, p, 0.5, subgroups.slices(manifest, []), resamples=200, seed=0)
    assert found["overall_recall"]["value"] == pytest.approx(130 / 160)
    viral, bacterial = found["subtype"]["viral"], found["subtype"]["bacterial"]
    assert viral["recall"]["value"] == pytest.approx(0.25) and viral["below_overall"]
    assert bacterial["recall"]["value"] == 1.0 and not bacterial["below_overall"]
    assert (viral["n"], viral["n_pneumonia"]) == (40, 40) and "specificity" not in viral
    assert set(found["subtype"]) == {"bacterial", "viral"}  # no PNEUMONIA in normal/unknown
    (band,) = found["size_band"].values()
    assert band["n"] == 320 and band["specificity"]["value"] == 1.0
