"""The one inference path: resize -> torch model -> calibration, as a single traceable ``nn.Module``.

Test, predict, tiling, export and serving all call :class:`InferenceModule`. It takes an image batch
[B,3,H,W] in [0,1] of any size, resizes it to the size the model was fitted at (antialiased bilinear,
the identity when the size already matches), runs the model (which normalises for its backbone itself,
so training and inference share that step) and applies the calibration buffers. Nothing in it branches
in Python on tensor values, so ``torch.jit.trace`` and the ONNX exporter can record it whole.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from adx.calibration import Calibrator


class Prediction(NamedTuple):
    """Outputs for a batch of B images at the model's input size H x W."""

    image_score: Tensor  # [B] raw score
    anomaly_map: Tensor  # [B,H,W] raw map
    pred_score: Tensor  # [B] normalised, 0.5 = image threshold (NaN before calibration)
    norm_map: Tensor  # [B,H,W] normalised, 0.5 = pixel threshold
    pred_label: Tensor  # [B] bool, score >= image threshold
    pred_mask: Tensor  # [B,H,W] bool, map >= pixel threshold


class Resize(nn.Module):
    """Images [B,C,h,w] -> [B,C,H,W], antialiased bilinear (exactly the identity at the same size)."""

    def __init__(self, size: tuple[int, int] | None) -> None:
        super().__init__()
        self.size = None if size is None else (int(size[0]), int(size[1]))

    def forward(self, images: Tensor) -> Tensor:
        if self.size is None:
            return images
        return F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=True)


class InferenceModule(nn.Module):
    """Images [B,3,H,W] in [0,1] -> :class:`Prediction` (resize, model, calibration)."""

    def __init__(self, model: nn.Module, calibrator: Calibrator, size: tuple[int, int] | None) -> None:
        super().__init__()
        self.resize, self.model, self.calibrator = Resize(size), model, calibrator

    def forward(self, images: Tensor) -> Prediction:
        scores, maps = self.model(self.resize(images))
        return Prediction(scores, maps, *self.calibrator(scores, maps))
