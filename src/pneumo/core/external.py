"""A model folder on data it never chose anything on: its metrics at the settings chosen on
validation, and how far the data lies from the training images.

Nothing is refitted: the threshold, calibration map, referral band and gate cut are the
folder's (:class:`pneumo.core.runtime.Classifier`), exactly as ``predict`` applies them, so
the numbers say what a user of the folder gets on that data. Every image counts in the
metrics, the ones the gate flags too (their share is reported beside them): leaving them out
would make a shifted set look better the more of it the gate refuses.

The shift summary puts the set's distance from training in two numbers people can compare
across sets: the 1-Wasserstein distance between its mean intensity histogram and the training
images' (in grey levels, 0-255), and the median of the gate's two distances (in units of
their cuts, so about 0.3-0.5 for images like the validation split's and above 1 where most
images would be flagged).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance

from pneumo.core import gate, referral
from pneumo.core.metrics import calibration_with_ci, metrics_with_ci, require_both_classes
from pneumo.core.runtime import Classifier

# Grey level at the centre of each of the gate's histogram bins.
BIN_CENTRES = (np.arange(gate.PIXEL_BINS) + 0.5) * 256 / gate.PIXEL_BINS


def histogram_distance(fitted_gate: dict[str, np.ndarray], pixels: np.ndarray) -> float:
    """Grey levels between the mean intensity histogram of (N, size, size) uint8 ``pixels``
    and the training images' (the gate keeps it as the first bins of its pixel mean)."""
    training = fitted_gate["pixels_mean"][: gate.PIXEL_BINS]
    found = gate.pixel_features(pixels)[:, : gate.PIXEL_BINS].mean(axis=0)
    return float(wasserstein_distance(BIN_CENTRES, BIN_CENTRES, training, found))


def shift_summary(
    fitted_gate: dict[str, np.ndarray], pixels: np.ndarray, distances: dict[str, np.ndarray]
) -> dict[str, float]:
    """The histogram distance and the median of each of the gate's distances
    (:func:`pneumo.core.gate.distances` of the same images)."""
    return {
        "histogram_distance": histogram_distance(fitted_gate, pixels),
        **{f"{space}_distance": float(np.median(distances[space])) for space in gate.SPACES},
    }


def assess(
    name: str,
    classifier: Classifier,
    pixels: np.ndarray,
    targets: np.ndarray,
    *,
    resamples: int,
    seed: int,
    batch_size: int = 64,
) -> dict:
    """Metrics with 95% bootstrap intervals, calibration errors, referral coverage, the gate's
    alarm rate and the shift summary of the labelled set ``name`` of prepared images."""
    targets = np.asarray(targets).astype(int)
    require_both_classes(
        targets, f"external set {name!r}", "add images of the missing class (NORMAL, PNEUMONIA)"
    )
    probability, distances = classifier.examine(pixels, batch_size)
    settings = classifier.settings
    threshold = settings.threshold
    flagged = gate.score(distances) > settings.gate.threshold
    return {
        "n": int(len(targets)),
        "n_pneumonia": int(targets.sum()),
        "metrics": metrics_with_ci(targets, probability, threshold, resamples=resamples, seed=seed),
        "calibration": calibration_with_ci(targets, probability, resamples=resamples, seed=seed),
        "referral": referral.assess(
            settings.referral, targets, probability, threshold, resamples=resamples, seed=seed
        ),
        "gate_alarm": float(flagged.mean()),
        "shift": shift_summary(classifier.gate, pixels, distances),
    }
