"""Build a network from a :class:`~emseg.config.ModelConfig`, after checking it against the
bounds of :class:`~emseg.config.Limits` (a checkpoint's header is untrusted: it may not make
emseg allocate gigabytes before failing)."""

from __future__ import annotations

from emseg.config import Limits, ModelConfig
from emseg.errors import BadInputError
from emseg.models.base import SegmentationNet
from emseg.models.unet import UNet


def unet_parameters(
    depth: int,
    base_channels: int,
    in_channels: int = ModelConfig.in_channels,
    out_channels: int = ModelConfig.out_channels,
) -> int:
    """A close estimate (within 0.1 %) of the parameter count of :class:`~emseg.models.unet.UNet`: two 3x3
    convolutions per level on the way down and up, plus the 2x2 up-convolutions."""
    total = 0
    for level in range(depth + 1):
        c = base_channels * 2**level
        c_in = in_channels if level == 0 else c // 2
        total += 9 * (c_in * c + c * c) + 2 * c  # encoder double convolution (+ norms)
        if level < depth:
            total += 4 * 2 * c * c + 9 * (2 * c * c + c * c) + 2 * c  # up-convolution and decoder
    return total + base_channels * out_channels + out_channels


def check_model_config(config: ModelConfig, limits: Limits | None = None, source: str = "") -> None:
    """Refuse a model config outside the bounds before anything is built: depth, channels and the
    estimated parameter count. ``source`` (a checkpoint's path) prefixes the message."""
    limits = limits or Limits.from_env()
    where = f"{source}: " if source else ""
    if not isinstance(config.arch, str) or not (config.arch == "unet" or config.arch.startswith("smp:")):
        raise BadInputError(f"{where}--arch {config.arch!r}: expected 'unet' or 'smp:ENCODER' (e.g. smp:resnet34)")
    for name in ("depth", "base_channels", "in_channels", "out_channels"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadInputError(f"{where}--{name.replace('_', '-')} {value!r}: must be a positive integer")
    if config.depth > limits.max_depth:
        raise BadInputError(
            f"{where}--depth {config.depth}: more than the limit of {limits.max_depth} levels "
            "(raise it with EMSEG_MAX_DEPTH)"
        )
    for name in ("base_channels", "in_channels", "out_channels"):
        value = getattr(config, name)
        if value > limits.max_channels:
            raise BadInputError(
                f"{where}--{name.replace('_', '-')} {value}: more than the limit of {limits.max_channels} channels "
                "(raise it with EMSEG_MAX_CHANNELS)"
            )
    if config.arch == "unet":
        n = unet_parameters(config.depth, config.base_channels, config.in_channels, config.out_channels)
        if n > limits.max_parameters:
            raise BadInputError(
                f"{where}depth {config.depth} with {config.base_channels} base channels: about {n:.3g} parameters, "
                f"more than the limit of {limits.max_parameters:.3g} (raise it with EMSEG_MAX_PARAMETERS)"
            )


def build_model(config: ModelConfig) -> SegmentationNet:
    """The network a config describes; it has ``divisor`` and ``halo`` attributes."""
    check_model_config(config)
    if config.arch == "unet":
        return UNet(config.in_channels, config.out_channels, config.depth, config.base_channels)
    if config.arch.startswith("smp:") and len(config.arch) > 4:
        from emseg.models.smp import SmpUNet

        return SmpUNet(config.arch[4:], config.encoder_weights, config.in_channels, config.out_channels)
    raise BadInputError(f"--arch {config.arch!r}: expected 'unet' or 'smp:ENCODER' (e.g. smp:resnet34)")
