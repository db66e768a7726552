"""Calibration maps and calibration errors: the maths, on generated probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score

from pneumo.core import calibration
from pneumo.core.metrics import calibration_errors, calibration_with_ci
from pneumo.records import Calibration


def _labels_and_probabilities(n: int, *, scale: float, shift: float = 0.0, seed: int = 0):
    """Labels drawn from sigmoid(z) and the probabilities sigmoid(scale·z + shift) a
    miscalibrated model would give for them (scale > 1: overconfident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return y, 1 / (1 + np.exp(-(scale * z + shift)))


def test_temperature_scaling_finds_the_temperature_of_an_overconfident_model():
    y, p = _labels_and_probabilities(20000, scale=2.0)
    fitted = calibration.fit("temperature", y, p)
    assert fitted.method == "temperature" and fitted.slope == pytest.approx(0.5, rel=0.05)
    calibrated = calibration.apply(fitted, p)
    assert calibration_errors(y, calibrated)["ece"] < calibration_errors(y, p)["ece"] / 3
    assert roc_auc_score(y, calibrated) == pytest.approx(roc_auc_score(y, p))  # same ranking


def test_platt_scaling_also_moves_the_prior():
    y, p = _labels_and_probabilities(20000, scale=1.0, shift=1.5)
    fitted = calibration.fit("platt", y, p)
    assert fitted.slope == pytest.approx(1.0, abs=0.1)
    assert fitted.intercept == pytest.approx(-1.5, abs=0.15)


def test_isotonic_map_is_sklearns_and_monotone():
    y, p = _labels_and_probabilities(2000, scale=3.0)
    fitted = calibration.fit("isotonic", y, p)
    grid = np.linspace(0, 1, 101)
    targets = calibration.smoothed_targets(y)
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p, targets)
    assert calibration.apply(fitted, grid) == pytest.approx(reference.predict(grid))
    assert np.all(np.diff(calibration.apply(fitted, grid)) >= 0)


def test_none_is_the_identity_and_a_saturated_probability_stays_finite():
    p = np.array([0.0, 0.2, 1.0])
    assert calibration.apply(Calibration(), p) == pytest.approx(p)
    mapped = calibration.apply(Calibration(method="temperature", slope=0.5), p)
    assert np.all(np.isfinite(mapped)) and mapped[0] > 0 and mapped[-1] < 1


def test_auto_measures_out_of_fold_and_keeps_the_identity_for_a_calibrated_model():
    y, overconfident = _labels_and_probabilities(3000, scale=3.0)
    chosen, losses = calibration.choose(y, overconfident)
    assert set(losses) == set(calibration.METHODS)
    assert chosen.method != "none" and losses[chosen.method] == min(losses.values())
    assert losses[chosen.method] < losses["none"] - 0.05

    y, calibrated = _labels_and_probabilities(3000, scale=1.0, seed=1)
    _, losses = calibration.choose(y, calibrated)
    assert losses["none"] <= min(losses.values()) + 0.005  # nothing to gain worth the name


def test_auto_with_too_few_images_of_a_class_keeps_the_identity():
    chosen, losses = calibration.choose(np.array([0, 0, 0, 1]), np.array([0.1, 0.2, 0.3, 0.9]))
    assert chosen == Calibration() and losses == {}


def test_calibration_errors_by_hand():
    # bin [0.1, 0.2): two images at 0.15, one positive -> gap |1 - 0.3| = 0.7 over 2 images
    # bin [0.9, 1.0]: two images at 0.95, both positive -> gap |2 - 1.9| = 0.1
    y = np.array([0, 1, 1, 1])
    p = np.array([0.15, 0.15, 0.95, 0.95])
    errors = calibration_errors(y, p)
    assert errors["ece"] == pytest.approx((0.7 + 0.1) / 4)
    assert errors["mce"] == pytest.approx(0.35)
    assert errors["brier"] == pytest.approx((0.15**2 + 0.85**2 + 2 * 0.05**2) / 4)
    perfect = calibration_errors(np.array([0, 1, 0, 1]), np.full(4, 0.5))
    assert perfect["ece"] == 0.0 and perfect["mce"] == 0.0


def test_calibration_intervals_contain_the_estimate():
    y, p = _labels_and_probabilities(400, scale=2.0)
    with_ci = calibration_with_ci(y, p, resamples=200, seed=0)
    for name, value in with_ci.items():
        assert value["ci_low"] <= value["value"] <= value["ci_high"], name
    assert with_ci == calibration_with_ci(y, p, resamples=200, seed=0)


def test_a_perfectly_separated_validation_split_gets_a_finite_map():
    """Without Platt's smoothed targets the slope would grow without bound and every image
    would get exactly 0 or 1."""
    y = np.array([0] * 20 + [1] * 20)
    p = np.concatenate([np.linspace(0.05, 0.4, 20), np.linspace(0.6, 0.95, 20)])
    for method in ("temperature", "platt"):
        fitted = calibration.fit(method, y, p)
        assert 1 < fitted.slope < 5, method  # sharper than the raw sigmoid, not a step
    isotonic = calibration.apply(calibration.fit("isotonic", y, p), p)
    assert set(np.round(isotonic, 9)) == {round(1 / 22, 9), round(21 / 22, 9)}
    assert calibration.smoothed_targets(np.array([1, 1, 0])) == pytest.approx([0.75, 0.75, 1 / 3])
