"""Losses on logits: the U-Net's pixel-weighted BCE, plain BCE, soft Dice and BCE + Dice."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from emseg.config import LOSSES
from emseg.errors import BadInputError

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of the weight map times the per-pixel binary cross-entropy (Ronneberger et al. 2015)."""
    return (F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none") * weight).mean()


def bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target)


def soft_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of P(cell) over the whole batch."""
    p = torch.sigmoid(logits.float())
    inter = (p * target).sum()
    return 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)


def bce_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return bce(logits, target, weight) + soft_dice(logits, target, weight)


def make_loss(name: str) -> Loss:
    """The loss called ``name`` (one of :data:`emseg.config.LOSSES`)."""
    table: dict[str, Loss] = {"weighted-bce": weighted_bce, "bce": bce, "dice": soft_dice, "bce+dice": bce_dice}
    if name not in table:
        raise BadInputError(f"--loss {name}: expected one of {', '.join(LOSSES)}")
    return table[name]


def logits_of(prob: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse sigmoid of probabilities (clamped), to score full-slice predictions with a loss."""
    p = prob.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)
