"""An exponential moving average of a network's weights (Polyak averaging).

Three held-out slices judge a young network noisily, and a small one trained for a few hundred
steps swings from step to step; the average of its recent weights is steadier and usually better
(Izmailov et al. 2018; timm's ModelEma). The average is what emseg validates and saves; the raw
weights keep training. The decay is ramped up early, ``min(decay, (1 + t) / (10 + t))`` after
``t`` updates, so the average forgets the random initial weights quickly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """A copy of ``model`` (same device and memory format) whose parameters and floating-point
    buffers follow the model's as an exponential moving average; integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.updates = 0

    def rate(self) -> float:
        """The decay of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.rate()
        mine: list[torch.Tensor] = list(self.model.parameters())
        theirs = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(mine, theirs, weight)
        for a, b in zip(self.model.buffers(), model.buffers(), strict=True):
            if a.is_floating_point():
                a.lerp_(b, weight)
            else:
                a.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict(tensors)
        self.updates = int(updates)


class WithAverage(nn.Module):
    """What the resume point saves: the model's tensors under their own names and the average's
    under ``ema.NAME`` (a resume point without them starts the average from the weights)."""

    def __init__(self, model: nn.Module, average: WeightAverage | None) -> None:
        super().__init__()
        self.inner, self.average = model, average

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:  # type: ignore[override]
        tensors = dict(self.inner.state_dict())
        if self.average is not None:
            tensors.update({f"ema.{k}": v for k, v in self.average.state_dict().items()})
        return tensors


def split_average(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, average tensors) of a resume point's model tensors."""
    model = {k: v for k, v in tensors.items() if not k.startswith("ema.")}
    return model, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}


__all__ = ["WeightAverage", "WithAverage", "split_average"]
