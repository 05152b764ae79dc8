"""EfficientAD's networks: the patch description network (PDN, sizes S and M) and the autoencoder."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

ModelSize = Literal["small", "medium"]
MODEL_SIZES = ("small", "medium")

# The autoencoder decoder's intermediate sizes for a 256 px input (the paper's appendix); other inputs scale them.
DECODER_SIZES = (3, 8, 15, 32, 63, 127)
ENCODER_CODE_SIZE = 8  # the last encoder conv (8 x 8, no padding) turns an 8 x 8 map into the 1 x 1 code


def pdn(model_size: ModelSize, out_channels: int, padding: bool = True) -> nn.Sequential:
    """Patch description network: images [B,3,H,W] -> [B,out_channels,h,w] with a 33 x 33 px receptive field.

    small: conv 4x4 (128) - ReLU - avgpool 2x2/2 - conv 4x4 (256) - ReLU - avgpool - conv 3x3 (256) - ReLU -
    conv 4x4 (out). medium: 256 / 512 channels and a 1x1 conv (512) after the second pool, a ReLU after the
    4x4 conv and a final 1x1 conv (out). ``padding``: the paper's table (3, 1, 3, 1, 1, 0: a 64 x 64 output
    for 256 px); False: none (56 x 56 for 256 px). A plain ``nn.Sequential``: its state dict keys are the
    layer indices (``0.weight``, ``3.weight``, ...), the layout a user's teacher file must have.
    """
    p = 1 if padding else 0
    if model_size == "small":
        layers: list[nn.Module] = [
            nn.Conv2d(3, 128, 4, padding=3 * p),
            nn.ReLU(),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(128, 256, 4, padding=3 * p),
            nn.ReLU(),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(256, 256, 3, padding=p),
            nn.ReLU(),
            nn.Conv2d(256, out_channels, 4),
        ]
    elif model_size == "medium":
        layers = [
            nn.Conv2d(3, 256, 4, padding=3 * p),
            nn.ReLU(),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(256, 512, 4, padding=3 * p),
            nn.ReLU(),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(512, 512, 1),
            nn.ReLU(),
            nn.Conv2d(512, 512, 3, padding=p),
            nn.ReLU(),
            nn.Conv2d(512, out_channels, 4),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 1),
        ]
    else:
        raise ValueError(
            f"model_size must be 'small' or 'medium', got {model_size!r}: fix --model.model_size"
        )
    return nn.Sequential(*layers)


def pdn_output_size(height: int, width: int, padding: bool) -> tuple[int, int]:
    """(h, w) of a PDN's output for an input of height x width (both sizes share the geometry)."""

    def side(n: int) -> int:
        p = 1 if padding else 0
        n = n + 6 * p - 3  # conv 4x4
        n = (n + 2 * p - 2) // 2 + 1  # avgpool 2x2/2
        n = n + 6 * p - 3
        n = (n + 2 * p - 2) // 2 + 1
        n = n + 2 * p - 2  # conv 3x3
        return n - 3  # conv 4x4, no padding

    return side(height), side(width)


class AutoEncoder(nn.Module):
    """Images [B,3,H,W] -> [B,out_channels,h,w] through a 64-number code (the paper's appendix table).

    Encoder: five 4x4 stride-2 convs (32, 32, 64, 64, 64 channels, ReLU) and an 8x8 conv to the 1x1 code (the
    fifth map is resized to 8 x 8 first when the input is not 256 px). Decoder: six steps of bilinear
    upsampling, a 4x4 conv (64, padding 2), ReLU and dropout; then upsampling to the PDN's output size and two
    3x3 convs (64, ReLU; then ``out_channels``). Sizes are fixed by the input shape, so a traced graph has none
    of its own.
    """

    def __init__(self, out_channels: int = 384, code: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        widths = (32, 32, 64, 64, 64)
        enc: list[nn.Module] = []
        channels = 3
        for width in widths:
            enc += [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.ReLU()]
            channels = width
        self.encoder = nn.Sequential(*enc)
        self.to_code = nn.Conv2d(channels, code, ENCODER_CODE_SIZE)
        steps = []
        channels = code
        for _ in DECODER_SIZES:
            steps.append(nn.Sequential(nn.Conv2d(channels, 64, 4, padding=2), nn.ReLU(), nn.Dropout(dropout)))
            channels = 64
        self.decoder = nn.ModuleList(steps)
        self.head = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, out_channels, 3, padding=1)
        )

    def forward(self, images: Tensor, out_size: tuple[int, int]) -> Tensor:
        """Images [B,3,H,W] (normalised) -> [B,out_channels,*out_size]."""
        height, width = int(images.shape[-2]), int(images.shape[-1])  # fixed sizes (constants when traced)
        x = self.encoder(images)
        if tuple(x.shape[-2:]) != (ENCODER_CODE_SIZE, ENCODER_CODE_SIZE):
            x = F.interpolate(x, size=(ENCODER_CODE_SIZE,) * 2, mode="bilinear", align_corners=False)
        x = self.to_code(x)
        for size, step in zip(DECODER_SIZES, self.decoder, strict=True):
            target = (max(1, round(size * height / 256)), max(1, round(size * width / 256)))
            x = step(F.interpolate(x, size=target, mode="bilinear", align_corners=False))
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return self.head(x)
