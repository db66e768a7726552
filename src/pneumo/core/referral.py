"""A referral band: the calibrated probabilities for which the model answers REFER (a person
reads the image) instead of a label, chosen on the validation split only.

The rule names floors that the *answered* decisions must meet on validation:

- ``sensitivity>=X`` sets the low cut, the highest one below which at most 1-X of the
  PNEUMONIA images fall (those are answered NORMAL: the misses the rule allows);
- ``specificity>=Y`` sets the high cut, the lowest one at or above which at most 1-Y of the
  NORMAL images lie (answered PNEUMONIA: the false alarms it allows).

The band runs between the two cuts, whichever is lower, and is widened to hold the
validation-chosen threshold, so an answered image always gets the label the threshold gives it
and the band only ever adds REFER answers. Where the classes overlap on validation the low cut
lies below the high one: the band is where the floors cannot both hold. Where validation
separates them (the low cut above the high one), any cut between the two meets both floors and
validation says nothing about which: an answer there would rest on that arbitrary choice, so
the band is that gap (on a small split, the probabilities no validation image came near).
``none`` is the empty band at the threshold: every image answered.

Reported on test: coverage (the share answered) and the metrics of the answered images with
bootstrap intervals, and the risk-coverage curve of referring the answers least likely to be
right first.
"""

from __future__ import annotations

import numpy as np

from pneumo.core.metrics import metrics_with_ci, require_both_classes, stratified_resamples
from pneumo.records import Referral
from pneumo.specs import ReferralRule

# Floating-point slack when a floor times a count should be a whole number of images.
SLACK = 1e-9


def choose_band(rule: str, y_val: np.ndarray, p_val: np.ndarray, threshold: float) -> Referral:
    """The band between the cuts that meet ``rule`` on validation labels and calibrated
    probabilities, each as tight as the floors allow (the low cut as high, the high cut as
    low), holding ``threshold``."""
    parsed = ReferralRule.parse(rule)
    low = high = threshold
    if parsed != ReferralRule():  # a floor on a class needs images of it
        require_both_classes(
            y_val,
            f"evaluate.refer {rule!r} on the validation split",
            "set evaluate.refer to none or give validation more patients (data.val_fraction)",
        )
    y_val, p_val = np.asarray(y_val).astype(int), np.asarray(p_val, dtype=np.float64)
    if parsed.min_sensitivity is not None:
        positives = np.sort(p_val[y_val == 1])
        misses = int(np.floor((1.0 - parsed.min_sensitivity) * len(positives) + SLACK))
        # below the cut only the `misses` lowest PNEUMONIA probabilities (ties go above it)
        low = positives[misses] if misses < len(positives) else np.inf
    if parsed.min_specificity is not None:
        negatives = np.sort(p_val[y_val == 0])[::-1]
        alarms = int(np.floor((1.0 - parsed.min_specificity) * len(negatives) + SLACK))
        # at or above the cut only the `alarms` highest NORMAL probabilities
        high = np.nextafter(negatives[alarms], np.inf) if alarms < len(negatives) else 0.0
    cuts = (low, high, threshold)
    return Referral(rule=rule, low=float(min(cuts)), high=float(max(cuts)))


def assess(
    band: Referral, y: np.ndarray, p: np.ndarray, threshold: float, *, resamples: int, seed: int
) -> dict:
    """Coverage with its bootstrap interval and the metrics of the answered images (the same
    stratified resamples as every other interval), or no metrics when every image is
    referred."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    inside = band.refers(p)
    answered = ~inside
    draws = answered[stratified_resamples(y, resamples, seed)].mean(axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    out = {
        "coverage": {"value": float(answered.mean()), "ci_low": float(low), "ci_high": float(high)},
        "n_referred": int(inside.sum()),
        "n_referred_pneumonia": int((inside & (y == 1)).sum()),
    }
    if answered.any():
        out["answered"] = metrics_with_ci(
            y[answered], p[answered], threshold, resamples=resamples, seed=seed
        )
    return out


def risk_coverage(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Coverage and the error rate of the answered images when the answers least likely to
    be right are referred first, one point per number answered.

    With calibrated probabilities the chance that the threshold's label is right is ``p`` for
    a PNEUMONIA answer and ``1 - p`` for a NORMAL one; a distance from the threshold would
    instead make a certain PNEUMONIA look doubtful whenever the threshold lies near 1.
    """
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    positive = p >= threshold
    chance_right = np.where(positive, p, 1.0 - p)
    order = np.argsort(-chance_right, kind="stable")
    wrong = (positive[order].astype(int) != y[order]).astype(float)
    answered = np.arange(1, len(y) + 1)
    return {"coverage": answered / len(y), "risk": np.cumsum(wrong) / answered}
