"""Measure how far an output pixel's dependence on the input reaches (the halo), by gradient."""

from __future__ import annotations

import torch
from torch import nn


def measure_halo(model: nn.Module, divisor: int, size: int = 768) -> int:
    """Largest distance (pixels) from the centre output pixel to an input pixel it depends on.

    Backpropagates from the centre pixel of a ``size`` x ``size`` input (rounded to ``divisor``)
    in eval mode and measures the extent of the non-zero input gradient. A halo that reaches the
    input's border is a lower bound; the size then doubles (up to 4096).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        while True:
            size = -(-size // divisor) * divisor
            gen = torch.Generator(device="cpu").manual_seed(0)
            # Several random inputs: one could leave the centre pixel's ReLUs all inactive.
            x = torch.randn(4, 1, size, size, generator=gen).to(device).requires_grad_(True)
            with torch.enable_grad():
                out = model(x)
                c = size // 2
                out[:, 0, c, c].sum().backward()
            assert x.grad is not None  # x requires grad and reaches the output
            grad = x.grad[:, 0].abs().sum(0) > 0
            ys, xs = torch.nonzero(grad, as_tuple=True)
            if len(ys) == 0:
                return 0
            reach = int(max((c - ys.min()).item(), (ys.max() - c).item(), (c - xs.min()).item(), (xs.max() - c).item()))
            if reach < c - 1 or size >= 4096:
                return reach
            size *= 2
    finally:
        model.train(was_training)
