"""The referral band: its rule language, the cuts chosen on validation, coverage and the
risk-coverage curve."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo.config import ConfigError, parse_params
from pneumo.core import referral
from pneumo.core.metrics import MetricsError, binary_metrics
from pneumo.records import Referral
from pneumo.specs import ReferralRule

# Validation: four NORMAL (0.1-0.4 and one at 0.7) and five PNEUMONIA (0.3-0.9).
Y_VAL = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
P_VAL = np.array([0.1, 0.2, 0.4, 0.7, 0.3, 0.6, 0.8, 0.85, 0.9])


@pytest.mark.parametrize(
    ("text", "sensitivity", "specificity"),
    [
        ("none", None, None),
        ("sensitivity>=0.98", 0.98, None),
        ("specificity>=0.9", None, 0.9),
        ("sensitivity>=1,specificity>=0.95", 1.0, 0.95),
        ("specificity>=0.95, sensitivity>=0.5", 0.5, 0.95),
    ],
)
def test_rules_parse(text, sensitivity, specificity):
    assert ReferralRule.parse(text) == ReferralRule(sensitivity, specificity)


@pytest.mark.parametrize(
    "text", ["sensitivity>0.9", "recall>=0.9", "sensitivity>=1.5", "sensitivity>=0.9,"
             "sensitivity>=0.8", "", "none,specificity>=0.9"],
)  # fmt: skip
def test_a_bad_rule_fails_in_config_naming_the_key(text):
    with pytest.raises(ConfigError, match="evaluate.refer"):
        parse_params({"evaluate": {"refer": text}})


def test_no_rule_is_an_empty_band_at_the_threshold():
    band = referral.choose_band("none", Y_VAL, P_VAL, 0.5)
    assert band == Referral(rule="none", low=0.5, high=0.5)
    assert not band.refers(P_VAL).any()


def test_the_sensitivity_floor_sets_the_highest_low_cut_that_meets_it():
    # 4 of 5 PNEUMONIA at or above 0.6: sensitivity 0.8; all 5 only from 0.3 on.
    assert referral.choose_band("sensitivity>=0.8", Y_VAL, P_VAL, 0.65).low == 0.6
    assert referral.choose_band("sensitivity>=0.81", Y_VAL, P_VAL, 0.65).low == 0.3
    # the band always holds the threshold: a threshold below the cut lowers it
    assert referral.choose_band("sensitivity>=0.8", Y_VAL, P_VAL, 0.5).low == 0.5


def test_the_specificity_floor_sets_the_lowest_high_cut_that_meets_it():
    # NORMAL at 0.7 is the one false alarm allowed above 0.4; above 0.7, none (specificity 1)
    assert referral.choose_band("specificity>=0.75", Y_VAL, P_VAL, 0.3).high == np.nextafter(0.4, 1)
    assert referral.choose_band("specificity>=1", Y_VAL, P_VAL, 0.5).high == np.nextafter(0.7, 1)
    band = referral.choose_band("sensitivity>=1,specificity>=1", Y_VAL, P_VAL, 0.5)
    assert (band.low, band.high) == (0.3, np.nextafter(0.7, 1))
    answered = ~band.refers(P_VAL)
    point = binary_metrics(Y_VAL[answered], P_VAL[answered], 0.5)
    assert point["recall"] == 1.0 and point["specificity"] == 1.0  # the floors, on validation


def test_a_validation_split_separated_at_the_floors_refers_the_gap_between_its_classes():
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    band = referral.choose_band("sensitivity>=1,specificity>=1", y, p, 0.8)
    assert (band.low, band.high) == (np.nextafter(0.2, 1), 0.8)
    assert list(band.refers(np.array([0.2, 0.5, 0.79, 0.8]))) == [False, True, True, False]
    assert not band.refers(p).any()  # validation itself is answered in full


def test_a_specificity_no_cut_reaches_refers_everything_above_the_low_cut():
    y, p = np.array([0, 1, 1]), np.array([1.0, 0.5, 0.9])
    band = referral.choose_band("specificity>=1", y, p, 0.5)
    assert band.high > 1.0 and band.refers(np.array([0.9, 1.0])).all()


def test_a_rule_on_one_class_of_validation_says_what_to_do():
    with pytest.raises(MetricsError, match="evaluate.refer.*data.val_fraction"):
        referral.choose_band("sensitivity>=0.9", np.ones(4), np.linspace(0.2, 0.8, 4), 0.5)


def test_coverage_and_the_answered_metrics():
    band = Referral(rule="test", low=0.35, high=0.75)
    out = referral.assess(band, Y_VAL, P_VAL, 0.5, resamples=200, seed=0)
    # 0.4, 0.7 and 0.6 are inside the band: 6 of 9 answered, PNEUMONIA at 0.3 wrongly
    assert out["coverage"]["value"] == pytest.approx(6 / 9)
    assert out["coverage"]["ci_low"] <= 6 / 9 <= out["coverage"]["ci_high"]
    assert (out["n_referred"], out["n_referred_pneumonia"]) == (3, 1)
    assert out["answered"]["accuracy"]["value"] == pytest.approx(5 / 6)
    assert out["answered"]["recall"]["value"] == pytest.approx(3 / 4)
    everything = Referral(rule="test", low=0.0, high=2.0)
    assert "answered" not in referral.assess(everything, Y_VAL, P_VAL, 0.5, resamples=20, seed=0)


def test_risk_coverage_refers_the_answers_least_likely_right_first():
    curve = referral.risk_coverage(Y_VAL, P_VAL, 0.5)
    assert curve["coverage"][-1] == 1.0
    # everything answered: the error rate at the threshold (0.7 NORMAL and 0.3 PNEUMONIA)
    assert curve["risk"][-1] == pytest.approx(2 / 9)
    # each error is right with calibrated chance 0.7: the five surer answers are all right
    assert list(curve["risk"][:5]) == [0.0] * 5


def test_a_threshold_near_one_does_not_make_a_certain_image_look_uncertain():
    # p = 1.0 lies 0.02 from the threshold but is surely right: it is answered first
    curve = referral.risk_coverage(np.array([1, 1, 0]), np.array([1.0, 0.5, 0.02]), 0.98)
    assert list(curve["risk"]) == pytest.approx([0.0, 0.0, 1 / 3])
