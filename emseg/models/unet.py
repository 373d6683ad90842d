"""The U-Net of Ronneberger et al. (2015) with padded convolutions.

Padding keeps the output the size of the input, so tiles can be stitched directly. Each level
has two 3x3 convolutions with BatchNorm and ReLU; 2x2 max-pooling down, 2x2 transposed
convolutions up, skip connections by concatenation, and a 1x1 head giving one logit per pixel:
P(cell interior) after a sigmoid, matching the ISBI labels (1 = cell).

Sizes: the input's height and width must be multiples of ``2**depth`` (:attr:`UNet.divisor`).
The output at a pixel depends on input pixels at most :attr:`UNet.halo` away (its receptive
field radius), so tiles overlapping by ``2 * halo`` give seam-free results even when cropped.
"""

from __future__ import annotations

import torch
from torch import nn

from emseg.config import ModelConfig
from emseg.models.base import SegmentationNet


def receptive_field(depth: int) -> int:
    """Receptive field (pixels, one side to the other) of a :class:`UNet` of ``depth`` levels.

    Two 3x3 convolutions add 4 pixels at the current stride, a 2x2 max-pool adds one step and
    doubles the stride; the transposed convolutions add nothing and halve it again.
    """
    field, stride = 1, 1
    for _ in range(depth):
        field += 4 * stride + stride
        stride *= 2
    field += 4 * stride  # bottleneck
    for _ in range(depth):
        stride //= 2
        field += 4 * stride
    return field


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(SegmentationNet):
    """U-Net: (B, in_channels, H, W) float -> (B, out_channels, H, W) logits.

    H and W must be multiples of ``2**depth``. ``depth=4, base_channels=64`` is the original
    network (31 M parameters).
    """

    def __init__(
        self,
        in_channels: int = ModelConfig.in_channels,
        out_channels: int = ModelConfig.out_channels,
        depth: int = ModelConfig.depth,
        base_channels: int = ModelConfig.base_channels,
    ) -> None:
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ValueError("depth and base_channels must be positive")
        self.depth, self.out_channels = depth, out_channels
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths[:-1]:
            self.down.append(_double_conv(c, w))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(widths[-2], widths[-1])
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(w * 2, w, kernel_size=2, stride=2))
            self.merge.append(_double_conv(w * 2, w))
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    @property
    def divisor(self) -> int:
        """Height and width of the input must be multiples of this."""
        return 2**self.depth

    @property
    def halo(self) -> int:
        """Pixels of context on each side that can influence an output pixel."""
        return receptive_field(self.depth) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)
