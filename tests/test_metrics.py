"""Thresholds, metrics, bootstrap intervals and paired tests on hand-made scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pneumo.core.metrics import (
    MetricsError,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    delong_covariance,
    delong_interval,
    delong_test,
    mcnemar_exact,
    paired_bootstrap_auc,
    resampled_metrics,
    stratified_resamples,
)

Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
P = np.array([0.1, 0.3, 0.35, 0.8, 0.2, 0.4, 0.6, 0.7, 0.9, 0.95])


def test_fixed_threshold_is_used_as_is():
    assert choose_threshold(0.8, Y, P) == 0.8


def test_youden_picks_the_threshold_maximising_tpr_minus_fpr():
    # At 0.4: tpr 5/6, fpr 1/4 → J = 0.583, the maximum over all cut points.
    assert choose_threshold("youden", Y, P) == 0.4


@pytest.mark.parametrize(("target", "expected"), [(0.5, 0.7), (0.8, 0.4), (1.0, 0.2)])
def test_recall_rule_picks_the_highest_threshold_reaching_the_target(target, expected):
    threshold = choose_threshold(f"recall>={target}", Y, P)
    assert threshold == expected
    assert recall_score(Y, threshold <= P) >= target
    assert recall_score(Y, threshold + 1e-9 <= P) < target or threshold == P.max()


@pytest.mark.parametrize("rule", ["youden", "recall>=0.9"])
def test_threshold_rule_on_a_one_class_validation_split_says_what_to_change(rule):
    with pytest.raises(MetricsError, match=r"only \['PNEUMONIA'\].*data\.val_fraction"):
        choose_threshold(rule, np.ones(5, int), P[:5])


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    m = binary_metrics(y, p, 0.5)
    predicted = p >= 0.5
    assert m["accuracy"] == pytest.approx(accuracy_score(y, predicted))
    assert m["precision"] == pytest.approx(precision_score(y, predicted))
    assert m["recall"] == pytest.approx(recall_score(y, predicted))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, ~predicted))
    assert m["f1"] == pytest.approx(f1_score(y, predicted))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, predicted))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["average_precision"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["tp"] + m["fn"] == y.sum() and m["tn"] + m["fp"] == (1 - y).sum()


def test_no_positive_predictions_give_zero_precision_not_an_error():
    m = binary_metrics(Y, P, 0.99)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0


def test_stratified_resamples_keep_the_class_counts():
    for idx in stratified_resamples(Y, 20, seed=0):
        assert Y[idx].sum() == Y.sum() and len(idx) == len(Y)


def _scores(n: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    return y, np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_more_samples():
    widths = []
    for n in (80, 1280):
        y, p = _scores(n)
        point = binary_metrics(y, p, 0.5)
        ci = bootstrap_ci(y, p, 0.5, resamples=300, seed=0)
        for metric in ("accuracy", "recall", "roc_auc", "f1"):
            low, high = ci[metric]
            assert low <= point[metric] <= high, metric
        widths.append(ci["roc_auc"][1] - ci["roc_auc"][0])
    assert widths[1] < widths[0] / 2


def test_bootstrap_is_reproducible_with_its_seed():
    y, p = _scores(100)
    assert bootstrap_ci(y, p, 0.5, resamples=50, seed=4) == bootstrap_ci(
        y, p, 0.5, resamples=50, seed=4
    )


def test_mcnemar_counts_only_discordant_pairs():
    y = np.ones(30, dtype=int)
    same = np.ones(30, dtype=int)
    assert mcnemar_exact(y, same, same) == 1.0
    a = np.ones(30, dtype=int)
    b = np.ones(30, dtype=int)
    b[:12] = 0  # b wrong on 12 images a gets right, never the reverse
    assert mcnemar_exact(y, a, b) == pytest.approx(2 * 0.5**12)


def test_paired_auc_difference_detects_a_better_model():
    y, good = _scores(400)
    noise = np.random.default_rng(9).random(400)
    result = paired_bootstrap_auc(y, good, noise, resamples=200, seed=0)
    assert result["difference"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, noise))
    assert result["ci_low"] > 0 and result["p"] < 0.05
    same = paired_bootstrap_auc(y, good, good, resamples=50, seed=0)
    assert same["difference"] == 0 and same["p"] == 1.0


def test_vectorised_resample_metrics_equal_binary_metrics_on_each_resample():
    y, p = _scores(120)
    p[:10] = 0.5  # ties, which the AUC kernel must count as one half
    draws = resampled_metrics(y, p, 0.5, resamples=15, seed=3)
    for row, idx in enumerate(stratified_resamples(y, 15, seed=3)):
        expected = binary_metrics(y[idx], p[idx], 0.5)
        for metric in draws:
            assert draws[metric][row] == pytest.approx(expected[metric]), metric


def _delong_by_definition(y: np.ndarray, scores: np.ndarray):
    """DeLong et al. (1988) written out: every positive against every negative, in loops."""
    positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n, k = len(positives), len(negatives), len(scores)

    def psi(x: float, z: float) -> float:
        return 1.0 if x > z else 0.5 if x == z else 0.0

    v10, v01 = np.zeros((k, m)), np.zeros((k, n))
    for r in range(k):
        for i, pos in enumerate(positives):
            for j, neg in enumerate(negatives):
                kernel = psi(scores[r, pos], scores[r, neg])
                v10[r, i] += kernel / n
                v01[r, j] += kernel / m
    aucs = v10.mean(axis=1)
    s10, s01 = np.zeros((k, k)), np.zeros((k, k))
    for r in range(k):
        for c in range(k):
            s10[r, c] = sum((v10[r] - aucs[r]) * (v10[c] - aucs[c])) / (m - 1)
            s01[r, c] = sum((v01[r] - aucs[r]) * (v01[c] - aucs[c])) / (n - 1)
    return aucs, s10 / m + s01 / n


def test_fast_delong_equals_the_definition_computed_pair_by_pair():
    rng = np.random.default_rng(5)
    y = (rng.random(45) < 0.4).astype(int)
    scores = np.round(rng.random((3, 45)) * 0.6 + 0.3 * y, 1)  # rounded: many ties
    aucs, covariance = delong_covariance(y, scores)
    expected_aucs, expected_covariance = _delong_by_definition(y, scores)
    np.testing.assert_allclose(aucs, expected_aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(covariance, expected_covariance, rtol=0, atol=1e-12)
    assert aucs == pytest.approx([roc_auc_score(y, row) for row in scores])


def test_the_delong_interval_agrees_with_the_bootstrap_and_stays_in_0_1():
    y, p = _scores(300, seed=2)
    low, high = delong_interval(y, p)
    boot_low, boot_high = bootstrap_ci(y, p, 0.5, resamples=2000, seed=0)["roc_auc"]
    assert low < roc_auc_score(y, p) < high
    assert (low, high) == pytest.approx((boot_low, boot_high), abs=0.01)
    assert delong_interval(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == (1.0, 1.0)
    with pytest.raises(MetricsError, match="both classes"):
        delong_interval(np.ones(3), np.array([0.1, 0.5, 0.9]))


def test_delong_test_detects_a_better_model_and_not_an_identical_one():
    y, good = _scores(400)
    noise = np.random.default_rng(9).random(400)
    better = delong_test(y, good, noise)
    assert better["difference"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, noise))
    assert better["p"] < 0.001
    assert delong_test(y, good, good) == {"difference": 0.0, "p": 1.0}
    a, b = _scores(60, seed=3)[1], _scores(60, seed=4)[1]
    y_small = _scores(60, seed=3)[0]
    assert 0.0 < delong_test(y_small, a, b)["p"] == pytest.approx(delong_test(y_small, b, a)["p"])
