"""Subgroup metrics: does the model miss some kinds of pneumonia, or some kinds of image, more
than its overall numbers say?

Two slicings of the test split, both read off what the data already carries:

- **subtype**: the Kaggle file names say which PNEUMONIA images are bacterial
  (``person12_bacteria_5.jpeg``) and which viral (``person12_virus_5.jpeg``); the generated
  sample is named the same way. NORMAL images are ``normal``; a PNEUMONIA image whose name
  says neither is ``unknown``.
- **size band**: the original image size stands in for the acquisition (device, site,
  protocol), which the data set does not record: thirds of the *training* images' pixel count,
  so every model and every test set is cut at the same edges.

Each subgroup gets its sensitivity (and, where it holds NORMAL images, specificity) at the
model's threshold with stratified bootstrap intervals, and is flagged when its sensitivity
interval lies wholly below the model's overall one. Nothing here chooses anything: the slices
report, they do not tune.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from pneumo.core.metrics import metrics_with_ci

_SUBTYPE = re.compile(r"_(bacteria|virus)_", re.IGNORECASE)
SUBTYPES = {"bacteria": "bacterial", "virus": "viral"}
SIZE_BANDS = 3  # thirds of the training images' pixel count


def subtype(path: str, target: int) -> str:
    """``normal``, ``bacterial``, ``viral`` or ``unknown`` for one image's path and label."""
    if not target:
        return "normal"
    match = _SUBTYPE.search(path.rsplit("/", 1)[-1])
    return SUBTYPES[match[1].lower()] if match else "unknown"


def size_edges(train_pixels: np.ndarray) -> list[float]:
    """The inner edges of the size bands: quantiles of the training images' pixel counts
    (fewer, or none, where many images share a size)."""
    quantiles = np.quantile(train_pixels, np.arange(1, SIZE_BANDS) / SIZE_BANDS)
    return sorted({float(q) for q in quantiles if q > np.min(train_pixels)})


def band_names(edges: list[float]) -> list[str]:
    """The size bands' names, smallest first, by their range in megapixels."""
    if not edges:
        return ["all sizes"]
    bounds = [f"{edge / 1e6:.3g}" for edge in edges]
    inner = [f"{low}–{high} MP" for low, high in zip(bounds[:-1], bounds[1:], strict=True)]
    return [f"< {bounds[0]} MP", *inner, f">= {bounds[-1]} MP"]


def slices(manifest: pd.DataFrame, edges: list[float]) -> pd.DataFrame:
    """``subtype`` and ``size_band`` (ordered categories) for the rows of a split's manifest
    (``path``, ``target``, ``width``, ``height``)."""
    pixels = (manifest.width * manifest.height).to_numpy()
    names = band_names(edges)
    return pd.DataFrame(
        {
            "subtype": pd.Categorical(
                [subtype(p, t) for p, t in zip(manifest.path, manifest.target, strict=True)],
                categories=[*SUBTYPES.values(), "unknown", "normal"],
            ),
            "size_band": pd.Categorical.from_codes(
                np.searchsorted(edges, pixels, side="right"), categories=names
            ),
        },
        index=manifest.index,
    )


def assess(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    groups: pd.DataFrame,
    *,
    resamples: int,
    seed: int,
) -> dict:
    """Per subtype (PNEUMONIA images only) and per size band: image counts, sensitivity and
    specificity with intervals, and whether the sensitivity interval lies below the overall
    one (``below_overall``)."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    overall = metrics_with_ci(y, p, threshold, resamples=resamples, seed=seed)["recall"]
    out: dict[str, dict] = {"overall_recall": overall}
    for slicing in ("subtype", "size_band"):
        labels = groups[slicing]
        out[slicing] = {}
        for name in labels.cat.categories:
            members = (labels == name).to_numpy()
            if not y[members].any():  # sensitivity needs PNEUMONIA images
                continue
            found = metrics_with_ci(
                y[members], p[members], threshold, resamples=resamples, seed=seed
            )
            row = {"n": int(members.sum()), "n_pneumonia": int(y[members].sum())}
            row["recall"] = found["recall"]
            if (y[members] == 0).any():
                row["specificity"] = found["specificity"]
            row["below_overall"] = bool(found["recall"]["ci_high"] < overall["ci_low"])
            out[slicing][name] = row
    return out
