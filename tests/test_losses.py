"""Focal loss and weighted BCE against their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pneumo.config import LossConfig
from pneumo.core.losses import FocalLoss, build_loss

LOGITS = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.5, 8.0])
TARGETS = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])


def _direct_focal(logit: float, target: float, gamma: float, alpha: float) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    p_t = p if target == 1 else 1.0 - p
    weight = alpha if target == 1 else 1.0
    return -weight * (1.0 - p_t) ** gamma * math.log(p_t)


@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, 2.0), (1.5, 1.0), (0.0, 3.0), (2.0, 0.25)])
def test_focal_loss_matches_the_direct_formula(gamma, alpha):
    pairs = zip(LOGITS.tolist(), TARGETS.tolist(), strict=True)
    expected = sum(_direct_focal(lo, t, gamma, alpha) for lo, t in pairs) / len(LOGITS)
    actual = FocalLoss(gamma=gamma, alpha=alpha)(LOGITS, TARGETS).item()
    assert actual == pytest.approx(expected, rel=1e-5)


def test_gamma_zero_alpha_one_is_binary_cross_entropy():
    focal = FocalLoss(gamma=0.0, alpha=1.0)(LOGITS, TARGETS)
    assert focal.item() == pytest.approx(F.binary_cross_entropy_with_logits(LOGITS, TARGETS).item())


def test_alpha_weighs_only_the_positive_class():
    negatives = TARGETS == 0
    base = FocalLoss(gamma=2.0, alpha=1.0)
    doubled = FocalLoss(gamma=2.0, alpha=2.0)
    assert doubled(LOGITS[negatives], TARGETS[negatives]) == base(
        LOGITS[negatives], TARGETS[negatives]
    )
    positives = ~negatives
    assert doubled(LOGITS[positives], TARGETS[positives]).item() == pytest.approx(
        2 * base(LOGITS[positives], TARGETS[positives]).item()
    )


def test_focal_loss_is_finite_for_extreme_logits_and_has_gradients():
    logits = torch.tensor([-100.0, 100.0, 50.0], requires_grad=True)
    loss = FocalLoss(gamma=2.0, alpha=2.0)(logits, torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_bce_pos_weight_auto_is_the_class_ratio():
    loss = build_loss(LossConfig(name="bce", pos_weight="auto"), n_negative=100, n_positive=300)
    assert loss.pos_weight.item() == pytest.approx(1 / 3)
    fixed = build_loss(LossConfig(name="bce", pos_weight=2.5), n_negative=1, n_positive=1)
    assert fixed.pos_weight.item() == 2.5
    assert build_loss(LossConfig(name="bce"), 1, 1).pos_weight is None
    assert isinstance(build_loss(LossConfig(name="focal"), 1, 1), FocalLoss)
