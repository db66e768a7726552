"""Calibrated PNEUMONIA probabilities: a monotone map fitted on the validation split only.

A network trained with focal loss (or a class-weighted loss and a balanced sampler) ranks
images well but its sigmoid is not a frequency: focal loss flattens confident outputs and
the sampler shifts the prior. The map takes the TTA-averaged probability to a calibrated one:

- ``temperature``: ``sigmoid(logit(p) / T)``, one parameter; keeps the ranking and the labels.
- ``platt``: ``sigmoid(a·logit(p) + b)``, two; also moves the prior; keeps the ranking (a > 0).
- ``isotonic``: any non-decreasing step map; the most flexible, needs the most images and
  merges neighbouring probabilities into ties (the ROC AUC can drop).
- ``none``: the identity.

``auto`` measures instead of guessing: the map with the lowest out-of-fold log loss on the
validation split (stratified folds), the identity among the candidates, so a small validation
split keeps a simple map or none.

Every map is fitted to Platt's smoothed targets (Platt 1999): ``(N₊ + 1) / (N₊ + 2)`` for a
positive and ``1 / (N₋ + 2)`` for a negative instead of 1 and 0. A validation split that the
network separates perfectly (common on small ones) would otherwise drive the fit to an
infinite slope, answering exactly 0 or 1 for every image.

Applying a map needs numpy only (:func:`apply`): the registered model ships this module.
"""

from __future__ import annotations

import numpy as np

from pneumo.records import Calibration

METHODS = ("none", "temperature", "platt", "isotonic")
# Probabilities are clipped this far from 0 and 1 before taking logits or logs: a float32
# sigmoid saturates at exactly 1.0 for confident images.
EPSILON = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPSILON, 1.0 - EPSILON)
    return np.log(p) - np.log1p(-p)


def apply(calibration: Calibration, p: np.ndarray) -> np.ndarray:
    """Calibrated probabilities of raw ones (any shape)."""
    p = np.asarray(p, dtype=np.float64)
    if calibration.method == "none":
        return p
    if calibration.method == "isotonic":
        xs, ys = np.asarray(calibration.knots, dtype=np.float64).T
        return np.interp(p, xs, ys)  # constant beyond the end knots, as fitted
    z = calibration.slope * logit(p) + calibration.intercept
    return 1.0 / (1.0 + np.exp(-z))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log-likelihood of labels under probabilities (clipped by EPSILON)."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPSILON, 1.0 - EPSILON)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def smoothed_targets(y: np.ndarray) -> np.ndarray:
    """Platt's targets for labels ``y``: a positive counts (N₊ + 1) / (N₊ + 2), a negative
    1 / (N₋ + 2), the posterior means of a uniform prior on each class's frequency."""
    y = np.asarray(y).astype(int)
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    return np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))


def fit(method: str, y: np.ndarray, p: np.ndarray) -> Calibration:
    """The map of ``method`` that fits labels ``y`` from raw probabilities ``p`` best (maximum
    likelihood of the smoothed targets; isotonic: least squares, as scikit-learn fits it)."""
    y = smoothed_targets(y)
    if method == "none":
        return Calibration()
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        knots = zip(iso.X_thresholds_.tolist(), iso.y_thresholds_.tolist(), strict=True)
        return Calibration(method="isotonic", knots=[list(k) for k in knots])
    from scipy.optimize import minimize

    z = logit(p)

    def nll(coefficients: np.ndarray) -> float:
        slope, intercept = (coefficients[0], 0.0) if method == "temperature" else coefficients
        margin = slope * z + intercept
        return float(np.mean(np.logaddexp(0.0, margin) - y * margin))

    start = [1.0] if method == "temperature" else [1.0, 0.0]
    found = minimize(nll, start, method="BFGS").x
    if method == "temperature":  # 1/T; a negative one would reverse the ranking
        return Calibration(method="temperature", slope=max(float(found[0]), EPSILON))
    return Calibration(method="platt", slope=float(found[0]), intercept=float(found[1]))


def out_of_fold_log_loss(
    method: str, y: np.ndarray, p: np.ndarray, *, folds: int, seed: int
) -> float:
    """Log loss of ``method``'s map on each fold of the images, fitted on the other folds."""
    from sklearn.model_selection import StratifiedKFold

    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    calibrated = np.empty_like(p)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fitted_on, held_out in splitter.split(p, y):
        calibrated[held_out] = apply(fit(method, y[fitted_on], p[fitted_on]), p[held_out])
    return log_loss(y, calibrated)


def choose(
    y: np.ndarray, p: np.ndarray, *, folds: int = 5, seed: int = 0
) -> tuple[Calibration, dict[str, float]]:
    """The map with the lowest out-of-fold log loss (the simpler one on a tie), refitted on
    all images, and every candidate's loss. With fewer than two images of a class in each
    fold there is nothing to measure: the identity, and no losses."""
    y = np.asarray(y)
    folds = min(folds, int(np.bincount(y.astype(int), minlength=2).min()))
    if folds < 2:
        return Calibration(), {}
    losses = {m: out_of_fold_log_loss(m, y, p, folds=folds, seed=seed) for m in METHODS}
    best = min(METHODS, key=losses.__getitem__)  # METHODS run simplest first: ties keep it
    return fit(best, y, p), losses
