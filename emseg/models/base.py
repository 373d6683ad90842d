"""What every emseg network exposes besides ``forward``: its size divisor and its halo."""

from __future__ import annotations

from torch import nn

from emseg.config import ModelConfig


class SegmentationNet(nn.Module):
    """A network from (B, 1, H, W) normalised images to (B, 1, H, W) logits of P(cell), or to
    (B, C, H, W) logits of C classes (softmax) when ``out_channels`` is C > 1."""

    out_channels: int = ModelConfig.out_channels

    @property
    def divisor(self) -> int:
        """Height and width of the input must be multiples of this."""
        raise NotImplementedError

    @property
    def halo(self) -> int:
        """Pixels of context on each side that can influence an output pixel."""
        raise NotImplementedError
