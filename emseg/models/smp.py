"""segmentation-models-pytorch U-Nets (``--arch smp:ENCODER``), imported lazily.

``encoder_weights=None`` by default so nothing is downloaded; ``"imagenet"`` needs internet.
"""

from __future__ import annotations

import torch

from emseg.config import ModelConfig
from emseg.errors import BadInputError
from emseg.models.base import SegmentationNet


class SmpUNet(SegmentationNet):
    """An ``smp.Unet`` with one input channel and one logit, exposing ``divisor`` and ``halo``."""

    def __init__(
        self,
        encoder: str,
        encoder_weights: str | None = None,
        in_channels: int = ModelConfig.in_channels,
        out_channels: int = ModelConfig.out_channels,
    ) -> None:
        super().__init__()
        try:
            import segmentation_models_pytorch as smp
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise BadInputError(f"--arch smp:{encoder} needs segmentation-models-pytorch ({exc})") from None
        try:
            self.net = smp.Unet(
                encoder_name=encoder, encoder_weights=encoder_weights, in_channels=in_channels, classes=out_channels
            )
        except (KeyError, ValueError) as exc:
            raise BadInputError(f"--arch smp:{encoder}: {exc}") from None
        except (OSError, RuntimeError) as exc:
            if encoder_weights is None:  # nothing was downloaded: not a network failure but a bug
                raise
            # Downloading pretrained weights failed (no network, a hub error, a bad hash).
            raise BadInputError(
                f"--arch smp:{encoder} --encoder-weights {encoder_weights}: could not get the weights ({exc}); "
                "they need internet, or use --encoder-weights none"
            ) from None
        self.encoder_name, self.out_channels = encoder, out_channels
        self._halo: int | None = None

    @property
    def divisor(self) -> int:
        return 2 ** len(self.net.encoder._out_channels[1:]) if hasattr(self.net.encoder, "_out_channels") else 32

    @property
    def halo(self) -> int:
        if self._halo is None:
            from emseg.models.halo import measure_halo

            self._halo = measure_halo(self, self.divisor)
        return self._halo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
