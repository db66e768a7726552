"""Pure maths of evaluation: thresholds, metrics, bootstrap intervals and paired tests.

No files, no models: everything takes arrays of labels (0/1) and PNEUMONIA probabilities.
A prediction is positive when ``probability >= threshold``.
"""

from __future__ import annotations

import numpy as np
import sklearn
from scipy.stats import binomtest, norm, rankdata
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)

from pneumo.config import CLASS_NAMES
from pneumo.errors import UserError
from pneumo.specs import ThresholdRule

POINT_METRICS = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "balanced_accuracy",
    "roc_auc",
    "average_precision",
    "brier",
)


class MetricsError(UserError):
    """The labels cannot support the requested statistic (too few images of a class)."""


def require_both_classes(y: np.ndarray, what: str, remedy: str) -> None:
    """ROC statistics compare positives with negatives: one class alone gives nothing."""
    present = [CLASS_NAMES[int(label)] for label in np.unique(y)]
    if len(present) < 2:
        raise MetricsError(
            f"{what} needs both classes, but there are only {present or 'no images'}; {remedy}"
        )


def _fast_sklearn():
    """Resamples of already validated arrays need no re-validation (a third of the time)."""
    return sklearn.config_context(skip_parameter_validation=True, assume_finite=True)


def choose_threshold(rule: float | str, y_val: np.ndarray, p_val: np.ndarray) -> float:
    """A fixed number, or a rule applied to *validation* labels and probabilities.

    ``youden``: maximises sensitivity + specificity - 1. ``recall>=X``: the highest
    threshold whose sensitivity reaches X (the most specific one that meets the target).
    """
    parsed = ThresholdRule.parse(rule)
    if parsed.fixed is not None:
        return parsed.fixed
    require_both_classes(
        y_val,
        f"evaluate.threshold {rule!r} on the validation split",
        "set a fixed threshold or give validation more patients (data.val_fraction)",
    )
    fpr, tpr, thresholds = roc_curve(y_val, p_val, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if parsed.min_recall is None:  # youden
        return float(thresholds[np.argmax(tpr - fpr)])
    return float(thresholds[np.argmax(tpr >= parsed.min_recall - 1e-12)])


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Point metrics from scikit-learn; ratios with an empty denominator are 0."""
    y = np.asarray(y).astype(int)
    predicted = (np.asarray(p) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, predicted, labels=[0, 1]).ravel()

    def ratio(a: float, b: float) -> float:
        return float(a / b) if b else 0.0

    recall, specificity = ratio(tp, tp + fn), ratio(tn, tn + fp)
    precision = ratio(tp, tp + fp)
    both = len(np.unique(y)) == 2
    return {
        "accuracy": ratio(tp + tn, len(y)),
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": ratio(2 * precision * recall, precision + recall),
        "balanced_accuracy": (recall + specificity) / 2,
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "average_precision": float(average_precision_score(y, p)) if both else float("nan"),
        "brier": float(brier_score_loss(y, p, labels=[0, 1])),
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
    }


def stratified_resamples(y: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Index arrays (resamples, n): each class resampled with replacement within itself."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    parts = [
        rng.choice(np.flatnonzero(y == label), size=(resamples, int((y == label).sum())))
        for label in np.unique(y)
    ]
    return np.concatenate(parts, axis=1)


def _auc_pair_matrix(p_pos: np.ndarray, p_neg: np.ndarray) -> np.ndarray:
    """1 where a positive outscores a negative, 0.5 for ties: the Mann-Whitney kernel."""
    return (p_pos[:, None] > p_neg[None, :]) + 0.5 * (p_pos[:, None] == p_neg[None, :])


def resampled_auc(y: np.ndarray, p: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """ROC AUC of each resample (rows of ``idx``) in the Mann-Whitney form.

    With each class resampled within itself, a resample's AUC is the mean of the
    positive-vs-negative kernel weighted by how often each image was drawn.
    """
    positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rows = np.arange(len(idx))[:, None] * len(y)
    counts = np.bincount((idx + rows).ravel(), minlength=len(idx) * len(y)).reshape(-1, len(y))
    kernel = _auc_pair_matrix(p[positives], p[negatives])
    weighted = (counts[:, positives] @ kernel) * counts[:, negatives]
    return weighted.sum(1) / (len(positives) * len(negatives))


def resampled_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float, *, resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Every point metric on each stratified resample, computed for all resamples at once.

    The same definitions as :func:`binary_metrics` (tests check them against scikit-learn
    resample by resample), vectorised because a thousand scikit-learn calls per metric
    dominated the evaluate stage.
    """
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    idx = stratified_resamples(y, resamples, seed)
    ys, ps = y[idx], p[idx]
    predicted = ps >= threshold
    tp = (predicted & (ys == 1)).sum(1)
    fp = (predicted & (ys == 0)).sum(1)
    fn = (~predicted & (ys == 1)).sum(1)
    tn = (~predicted & (ys == 0)).sum(1)

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros(len(a)), where=b > 0)

    recall, specificity, precision = ratio(tp, tp + fn), ratio(tn, tn + fp), ratio(tp, tp + fp)
    out = {
        "accuracy": (tp + tn) / y.size,
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": ratio(2 * precision * recall, precision + recall),
        "balanced_accuracy": (recall + specificity) / 2,
        "brier": ((ps - ys) ** 2).mean(1),
    }
    if len(np.unique(y)) == 2:
        out["roc_auc"] = resampled_auc(y, p, idx)
        with _fast_sklearn():
            out["average_precision"] = np.array(
                [average_precision_score(a, b) for a, b in zip(ys, ps, strict=True)]
            )
    else:
        out["roc_auc"] = out["average_precision"] = np.full(resamples, np.nan)
    return out


def bootstrap_ci(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    *,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every point metric over stratified bootstrap resamples."""
    draws = resampled_metrics(y, p, threshold, resamples=resamples, seed=seed)
    tail = (1.0 - level) / 2 * 100

    def interval(values: np.ndarray) -> tuple[float, float]:
        defined = values[~np.isnan(values)]  # AUC and AP are undefined with one class
        if not defined.size:
            return float("nan"), float("nan")
        low, high = np.percentile(defined, [tail, 100 - tail])
        return float(low), float(high)

    return {m: interval(draws[m]) for m in POINT_METRICS}


def metrics_with_ci(
    y: np.ndarray, p: np.ndarray, threshold: float, *, resamples: int, seed: int
) -> dict[str, dict[str, float] | int]:
    """``{metric: {value, ci_low, ci_high}}`` plus the confusion-matrix counts."""
    point = binary_metrics(y, p, threshold)
    ci = bootstrap_ci(y, p, threshold, resamples=resamples, seed=seed)
    out: dict[str, dict[str, float] | int] = {
        m: {"value": point[m], "ci_low": ci[m][0], "ci_high": ci[m][1]} for m in POINT_METRICS
    }
    out |= {k: point[k] for k in ("tn", "fp", "fn", "tp")}
    return out


CALIBRATION_BINS = 10


def calibration_errors(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Expected and maximum calibration error over equal-width probability bins, and Brier.

    ECE weighs each bin's |observed frequency - mean probability| by its share of the images
    (Guo et al. 2017); MCE is the largest gap of a non-empty bin. The Brier score mixes
    calibration with discrimination: it is reported beside them, not instead.
    """
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    observed = np.bincount(which, weights=y, minlength=bins)
    predicted = np.bincount(which, weights=p, minlength=bins)
    gap = np.abs(observed - predicted)
    filled = count > 0
    return {
        "ece": float(gap.sum() / len(y)),
        "mce": float((gap[filled] / count[filled]).max()),
        "brier": float(np.mean((p - y) ** 2)),
    }


def calibration_with_ci(
    y: np.ndarray, p: np.ndarray, *, resamples: int, seed: int
) -> dict[str, dict[str, float]]:
    """:func:`calibration_errors` with 95% percentile intervals over stratified resamples
    (the same resamples as the other metrics' for a given seed)."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    draws = [calibration_errors(y[i], p[i]) for i in stratified_resamples(y, resamples, seed)]
    point = calibration_errors(y, p)
    out = {}
    for name, value in point.items():
        low, high = np.percentile([d[name] for d in draws], [2.5, 97.5])
        out[name] = {"value": value, "ci_low": float(low), "ci_high": float(high)}
    return out


def mcnemar_exact(y: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value for paired accuracies on the same images."""
    correct_a = np.asarray(predicted_a) == np.asarray(y)
    correct_b = np.asarray(predicted_b) == np.asarray(y)
    only_a = int((correct_a & ~correct_b).sum())
    only_b = int((~correct_a & correct_b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def delong_covariance(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUCs of several score rows on the same images and DeLong's covariance matrix.

    The fast algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21:1389): the
    structural components of DeLong et al. (1988) come from midranks instead of comparing
    every positive with every negative, O(n log n) per row. Ties count one half.
    ``scores`` is (k, n); returns the k AUCs and their (k, k) covariance.
    """
    y = np.asarray(y).astype(int)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positives, negatives = scores[:, y == 1], scores[:, y == 0]
    m, n = positives.shape[1], negatives.shape[1]
    within_pos = rankdata(positives, axis=1)
    within_neg = rankdata(negatives, axis=1)
    pooled = rankdata(np.hstack([positives, negatives]), axis=1)
    aucs = (pooled[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (pooled[:, :m] - within_pos) / n  # per positive: share of negatives it outscores
    v01 = 1.0 - (pooled[:, m:] - within_neg) / m  # per negative: share of positives above it
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, covariance


def delong_interval(y: np.ndarray, p: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The ROC AUC's normal-approximation interval with DeLong's variance, clipped to [0, 1]:
    analytic, so a registration gives the same interval every time. It shrinks to a point
    where the classes do not overlap (the variance vanishes), as the bootstrap's does."""
    require_both_classes(y, "an AUC interval", "the split needs images of both classes")
    aucs, covariance = delong_covariance(y, np.asarray(p)[None])
    half = norm.ppf(0.5 + level / 2) * np.sqrt(max(float(covariance[0, 0]), 0.0))
    return max(0.0, float(aucs[0] - half)), min(1.0, float(aucs[0] + half))


def delong_test(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray) -> dict[str, float]:
    """DeLong's test of AUC(a) = AUC(b) on the same images: the difference and two-sided p.

    The analytic counterpart of :func:`paired_bootstrap_auc`, and the test that papers on
    paired ROC curves usually report.
    """
    require_both_classes(
        y, "DeLong's test on the test split", "the test split needs images of both classes"
    )
    aucs, cov = delong_covariance(y, np.vstack([p_a, p_b]))
    difference = float(aucs[0] - aucs[1])
    variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if variance <= 0:  # no structural component varies: any difference is certain
        return {"difference": difference, "p": 1.0 if difference == 0 else 0.0}
    z = difference / np.sqrt(variance)
    return {"difference": difference, "p": float(2 * norm.sf(abs(z)))}


def paired_bootstrap_auc(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, *, resamples: int, seed: int
) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same resampled images, its 95% interval and two-sided p."""
    y, p_a, p_b = np.asarray(y).astype(int), np.asarray(p_a), np.asarray(p_b)
    require_both_classes(
        y, "the paired AUC bootstrap on the test split", "the test split needs both classes"
    )
    idx = stratified_resamples(y, resamples, seed)
    differences = resampled_auc(y, p_a, idx) - resampled_auc(y, p_b, idx)
    observed = float(roc_auc_score(y, p_a) - roc_auc_score(y, p_b))
    low, high = np.percentile(differences, [2.5, 97.5])
    # How often the resampled difference lands on the other side of zero, doubled.
    p_value = min(1.0, 2 * min((differences <= 0).mean(), (differences >= 0).mean()))
    return {"difference": observed, "ci_low": float(low), "ci_high": float(high), "p": p_value}
