"""The input gate: how far an image lies from the training images, and a cut above which
the model gives no label.

A classifier answers with full confidence on anything that decodes as an image. The gate
measures two distances from the training split, each the Mahalanobis distance under a
probabilistic-PCA covariance (Tipping & Bishop 1999: the top ``components`` principal
directions with their own variances plus one isotropic variance for the rest, invertible with
fewer images than dimensions and stored in ``components x dimensions`` numbers):

- in the network's own **features** (the pooled vector entering the head), which see content:
  noise, an inverted or overexposed image;
- in **pixels**: the intensity histogram, an 8 x 8 thumbnail and the histogram of steps
  between neighbouring pixels, which see what global pooling averages away: a flat gradient,
  a texture, a rotated radiograph, an exposure far off, noise (a network at 64 px from
  scratch maps uniform noise among the radiographs' features; radiographs are smooth).

Each distance has its own cut on the validation split, at the percentile that leaves half of
``100 - percentile`` above it, and an image beyond either cut is flagged: about 1% of
validation images by design at ``percentile: 99`` (on a small split, the highest image of each
space at least: 2 of 76 on the sample). The score is the larger distance in
units of its cut, so the gate's threshold is 1. Measured against it (``evaluate`` reports all
of them): each distance alone, and a logit-energy score (``-log(1 + e^|z|)``, the one-logit
form of Liu et al. 2020), which sees only how confident the head is, while a confident answer
on a photograph is exactly what the gate must catch.

Applying the gate needs numpy only (the network's features come from
:mod:`pneumo.core.graph`, or from an exported graph): the registered model and the torch-free
runtime (:mod:`pneumo.core.runtime`) use this module as it is.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from pneumo.files import sha256_of, write_bytes_atomic
from pneumo.records import InputGate

METHOD = "ppca-mahalanobis: network features and pixels"
# Variances below this are treated as this: a direction the training images never vary along
# would otherwise give an infinite distance to any image that does.
MIN_VARIANCE = 1e-6


PIXEL_BINS = 32
THUMBNAIL = 8
# Edges (grey levels) of the histogram of differences between neighbouring pixels: radiographs
# are smooth at any size the models see, noise is not.
STEP_EDGES = np.array([0, 2, 4, 8, 16, 32, 64, 128, 256])


def _step_histogram(batch: np.ndarray) -> np.ndarray:
    """(N, size, size) uint8 → (N, 8): the share of neighbour differences per bin."""
    pixels = batch.astype(np.int16)
    steps = np.concatenate(
        [
            np.abs(np.diff(pixels, axis=1)).reshape(len(batch), -1),
            np.abs(np.diff(pixels, axis=2)).reshape(len(batch), -1),
        ],
        axis=1,
    )
    which = np.searchsorted(STEP_EDGES, steps, side="right") - 1
    counts = np.stack([np.bincount(row, minlength=len(STEP_EDGES) - 1) for row in which])
    return counts / steps.shape[1]


def _thumbnail(batch: np.ndarray) -> np.ndarray:
    """(N, size, size) uint8 → (N, 8 x 8) in 0..1: the mean of each cell, cells bounded as
    adaptive average pooling bounds them (``floor(i·size/8)`` to ``ceil((i+1)·size/8)``)."""
    size = batch.shape[-1]
    cells = [(i * size // THUMBNAIL, -(-(i + 1) * size // THUMBNAIL)) for i in range(THUMBNAIL)]
    pixels = batch.astype(np.float64)
    rows = np.stack([pixels[:, a:b].mean(axis=1) for a, b in cells], axis=1)
    grid = np.stack([rows[:, :, a:b].mean(axis=2) for a, b in cells], axis=2)
    return grid.reshape(len(batch), -1) / 255


def pixel_features(images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(N, size, size) uint8 → (N, 32 + 64 + 8): the intensity histogram (fractions), an
    8 x 8 area-averaged thumbnail in 0..1 and the histogram of steps between neighbouring
    pixels (fractions), ``chunk`` images in memory at a time."""
    out = []
    for start in range(0, len(images), chunk):
        batch = np.asarray(images[start : start + chunk])
        bins = (batch.reshape(len(batch), -1).astype(np.int32) * PIXEL_BINS) // 256
        histogram = np.stack([np.bincount(row, minlength=PIXEL_BINS) for row in bins])
        out.append(
            np.hstack([histogram / bins.shape[1], _thumbnail(batch), _step_histogram(batch)])
        )
    return np.vstack(out)


def _fit_ppca(x: np.ndarray, components: int) -> dict[str, np.ndarray]:
    """Mean, principal directions, their variances and the isotropic rest."""
    mean = x.mean(axis=0)
    _, singular, directions = np.linalg.svd(x - mean, full_matrices=False)
    variances = singular**2 / max(len(x) - 1, 1)
    k = min(components, len(variances))
    rest = variances[k:].sum() / max(x.shape[1] - k, 1)
    return {
        "mean": mean,
        "directions": directions[:k],
        "variances": np.maximum(variances[:k], MIN_VARIANCE),
        "rest": np.array(max(rest, MIN_VARIANCE)),
    }


def _distance(fitted: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance per row under the probabilistic-PCA covariance."""
    centred = x - fitted["mean"]
    along = centred @ fitted["directions"].T
    residual = (centred**2).sum(axis=1) - (along**2).sum(axis=1)
    return (along**2 / fitted["variances"]).sum(axis=1) + residual / fitted["rest"]


SPACES = ("features", "pixels")


def fit(
    train: dict[str, np.ndarray], val: dict[str, np.ndarray], components: int, percentile: float
) -> dict[str, np.ndarray]:
    """The gate's arrays from training features and pixels (``{"features": …, "pixels": …}``,
    see :func:`pixel_features`), each space's cut at the validation percentile that leaves
    half of ``100 - percentile`` above it, so that together they flag at most
    ``100 - percentile`` % of validation."""
    fitted: dict[str, np.ndarray] = {}
    for space in SPACES:
        ppca = _fit_ppca(train[space], components)
        cut = np.percentile(_distance(ppca, val[space]), 100 - (100 - percentile) / 2)
        fitted |= {f"{space}_{name}": value for name, value in ppca.items()}
        fitted[f"{space}_cut"] = np.array(max(cut, MIN_VARIANCE))
    return fitted


def distances(fitted: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict:
    """Each space's distance from the training images, in units of its cut (above 1: flagged
    by that space)."""
    out = {}
    for space in SPACES:
        prefix = f"{space}_"
        ppca = {
            name.removeprefix(prefix): v for name, v in fitted.items() if name.startswith(prefix)
        }
        out[space] = _distance(ppca, inputs[space]) / ppca["cut"]
    return out


def score(distances: dict[str, np.ndarray]) -> np.ndarray:
    """The gate's score from :func:`distances`: the larger of the two, in units of their
    cuts; above 1, the input gets no label."""
    return np.maximum(*(distances[space] for space in SPACES))


def energy(logits: np.ndarray) -> np.ndarray:
    """The logit-energy score of a one-logit head, higher for less confident answers."""
    return -np.logaddexp(0.0, np.abs(logits))


def save(fitted: dict[str, np.ndarray], folder: Path) -> str:
    """Write the fitted arrays as the model folder's gate file, an ``.npz`` any numpy reads
    (no pickle), with fixed entry dates so the same arrays give the same bytes; returns its
    SHA-256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(fitted):
            array = io.BytesIO()
            np.lib.format.write_array(array, np.asarray(fitted[name]), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                             array.getvalue())  # fmt: skip
    path = folder / InputGate.FILE
    write_bytes_atomic(path, buffer.getvalue())
    return sha256_of(path)


def load(folder: Path) -> dict[str, np.ndarray]:
    """The fitted arrays of a model folder's gate (read without pickle)."""
    with np.load(folder / InputGate.FILE, allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}
