"""Losses on logits: the U-Net's pixel-weighted BCE, plain BCE, soft Dice and BCE + Dice, and their
softmax forms for several classes (unlabelled pixels ignored)."""

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


# --- several classes: (B, C, H, W) logits, (B, 1, H, W) class numbers 1..C (0 unlabelled, ignored) ---


def _classes(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pixel cross-entropy (B, H, W), labelled mask (B, H, W) float, labelled count >= 1)."""
    t = target[:, 0].long()
    labelled = (t > 0).float()
    ce = F.cross_entropy(logits.float(), (t - 1).clamp(min=0), reduction="none")
    return ce, labelled, labelled.sum().clamp(min=1.0)


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The weight map times the per-pixel softmax cross-entropy, averaged over labelled pixels."""
    ce, labelled, n = _classes(logits, target)
    return (ce * weight[:, 0].float() * labelled).sum() / n


def ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    loss, labelled, n = _classes(logits, target)
    return (loss * labelled).sum() / n


def soft_dice_classes(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1 - the mean over classes of the soft Dice of the softmax, on labelled pixels."""
    t = target[:, 0].long()
    labelled = (t > 0).float()[:, None]
    p = torch.softmax(logits.float(), dim=1) * labelled
    onehot = F.one_hot((t - 1).clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2).float() * labelled
    inter = (p * onehot).sum(dim=(0, 2, 3))
    dice = (2 * inter + 1) / (p.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3)) + 1)
    return 1 - dice.mean()


def ce_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ce(logits, target, weight) + soft_dice_classes(logits, target, weight)


def make_loss(name: str, n_classes: int = 1) -> Loss:
    """The loss called ``name`` (one of :data:`emseg.config.LOSSES`); with ``n_classes`` > 1 its
    softmax form (cross-entropy for BCE, Dice averaged over the classes), unlabelled pixels ignored."""
    binary: dict[str, Loss] = {"weighted-bce": weighted_bce, "bce": bce, "dice": soft_dice, "bce+dice": bce_dice}
    several: dict[str, Loss] = {"weighted-bce": weighted_ce, "bce": ce, "dice": soft_dice_classes, "bce+dice": ce_dice}
    table = binary if n_classes <= 1 else several
    if name not in table:
        raise BadInputError(f"--loss {name}: expected one of {', '.join(LOSSES)}")
    return table[name]


def logits_of(prob: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse sigmoid of probabilities (clamped), to score full-slice predictions with a loss."""
    p = prob.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)
