"""DSR's trained networks: subspace restriction, object-specific decoder, anomaly detection and upsampling U-Nets.

Layer layouts follow the authors' code (convolutions with InstanceNorm and ReLU, 2x2 max-pooling down,
bilinear upsampling + convolution up); upsampling goes back to each level's exact size. InstanceNorm keeps
no running statistics, so training and inference normalise alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.models.dsr.vq import residual_stack


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU()]


def _block(cin: int, mid: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv + InstanceNorm + ReLU layers, cin -> mid -> cout."""
    return nn.Sequential(*_conv(cin, mid), *_conv(mid, cout))


class _Up(nn.Module):
    """Bilinear upsampling to a given size, then 3x3 conv + InstanceNorm + ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*_conv(cin, cout))

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


class SubspaceRestriction(nn.Module):
    """Encoder-decoder without skips over a quantised map [B,D,h,w] -> features [B,D,h,w] to re-quantise.

    Widths w, 2w, 4w (two poolings), decoded back to D channels: it learns to map altered (anomalous)
    codebook patterns to the category's normal ones (the paper's object-specific subspace).
    """

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.enc = nn.ModuleList([_block(dim, width, width), _block(width, 2 * width, 2 * width)])
        self.bottom = _block(2 * width, 4 * width, 4 * width)
        self.ups = nn.ModuleList([_Up(4 * width, 2 * width), _Up(2 * width, width)])
        self.dec = nn.ModuleList([_block(2 * width, 2 * width, 2 * width), _block(width, width, width)])
        self.out = nn.Conv2d(width, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        sizes = []
        for block in self.enc:
            x = block(x)
            sizes.append(x.shape[-2:])
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, block, size in zip(self.ups, self.dec, reversed(sizes), strict=True):
            x = block(up(x, size))
        return self.out(x)


class ObjectDecoder(nn.Module):
    """Object-specific appearance decoder: [B,2D,H/4,W/4] (upsampled Q_lo | Q_hi) -> image [B,3,H,W].

    Two conv blocks (widths w -> 2w, 2w -> 4w) with pooling to stride 16, a 1x1 convolution to 64 channels,
    two transposed convolutions back to stride 4, then the VQ-VAE decoder's layout (conv, residual stack,
    two transposed convolutions). The authors use w = 2D = 256; the 64 channels are theirs at any width.
    """

    bottleneck = 64

    def __init__(
        self, dim: int, width: int, hiddens: int, residual_hiddens: int, residual_layers: int
    ) -> None:
        super().__init__()
        b = self.bottleneck
        self.down = nn.Sequential(
            _block(2 * dim, width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 2 * width, 4 * width),
            nn.MaxPool2d(2),
            nn.Conv2d(4 * width, b, 1),
        )
        self.up = nn.Sequential(
            nn.ConvTranspose2d(b, b, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(b, b, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(b, hiddens, 3, padding=1),
            residual_stack(hiddens, residual_hiddens, residual_layers),
            nn.ConvTranspose2d(hiddens, hiddens // 2, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(hiddens // 2, 3, 4, 2, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class UNet(nn.Module):
    """U-Net with skips, widths w, 2w, 4w, 4w (three poolings): [B,cin,H,W] -> logits [B,classes,H,W].

    The anomaly detection module (cin 6: object-specific | general image) and the upsampling module
    (cin 8: both images | the detection module's softmax) are both this network with w = 64.
    """

    def __init__(self, cin: int, classes: int = 2, width: int = 64) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 4 * width]
        self.enc = nn.ModuleList(_block(a, b, b) for a, b in zip([cin, *w[:-1]], w, strict=True))
        self.ups = nn.ModuleList(_Up(w[i + 1], w[i]) for i in reversed(range(3)))
        self.dec = nn.ModuleList(_block(2 * w[i], w[i], w[i]) for i in reversed(range(3)))
        self.out = nn.Conv2d(width, classes, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.enc):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.ups, self.dec, strict=True):
            skip = skips.pop()
            x = block(torch.cat([up(x, skip.shape[-2:]), skip], dim=1))
        return self.out(x)
