"""Losses on PNEUMONIA logits, built by name from ``params.yaml: loss``.

Focal loss (Lin et al., 2017) for binary targets::

    p_t   = p if y = 1 else 1 - p
    w_t   = alpha if y = 1 else 1            # alpha weighs the positive class only
    loss  = w_t * (1 - p_t) ** gamma * -log(p_t)

so gamma = 0, alpha = 1 is plain binary cross-entropy. Note that this ``alpha`` is the
recipe's "weight of the positive class" (alpha = 2 doubles PNEUMONIA), not the paper's
alpha in [0, 1] that balances the two classes as alpha and 1 - alpha.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pneumo.config import LossConfig


class FocalLoss(nn.Module):
    def __init__(self, gamma: float = 2.0, alpha: float = 1.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float()
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p_t = torch.exp(-bce)  # exact, and stable for large logits
        weight = torch.where(targets > 0.5, self.alpha, 1.0)
        return (weight * (1.0 - p_t) ** self.gamma * bce).mean()


def build_loss(config: LossConfig, n_negative: int, n_positive: int) -> nn.Module:
    """``pos_weight: auto`` is n_negative / n_positive of the training split."""
    if config.name == "focal":
        return FocalLoss(gamma=config.gamma, alpha=config.alpha)
    if config.pos_weight == "none":
        return nn.BCEWithLogitsLoss()
    weight = n_negative / max(n_positive, 1) if config.pos_weight == "auto" else config.pos_weight
    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(weight)))
