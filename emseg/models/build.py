"""Build a network from a :class:`~emseg.config.ModelConfig`."""

from __future__ import annotations

from emseg.config import ModelConfig
from emseg.errors import BadInputError
from emseg.models.base import SegmentationNet
from emseg.models.unet import UNet


def build_model(config: ModelConfig) -> SegmentationNet:
    """The network a config describes; it has ``divisor`` and ``halo`` attributes."""
    if config.arch == "unet":
        if config.depth < 1 or config.base_channels < 1:
            raise BadInputError(f"--depth {config.depth} / --base-channels {config.base_channels}: must be positive")
        return UNet(config.in_channels, config.out_channels, config.depth, config.base_channels)
    if config.arch.startswith("smp:") and len(config.arch) > 4:
        from emseg.models.smp import SmpUNet

        return SmpUNet(config.arch[4:], config.encoder_weights, config.in_channels, config.out_channels)
    raise BadInputError(f"--arch {config.arch!r}: expected 'unet' or 'smp:ENCODER' (e.g. smp:resnet34)")
