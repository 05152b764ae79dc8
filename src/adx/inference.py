"""The one inference path: resize -> torch model -> calibration, as a single traceable ``nn.Module``.

Test, predict, tiling, export and serving all call :class:`InferenceModule`. It takes an image batch
[B,3,H,W] in [0,1] of any size, resizes it to the size the model was fitted at (antialiased bilinear
written as two matrix products, see :class:`Resize`; the identity when the size already matches), runs the model (which normalises for its backbone itself,
so training and inference share that step) and applies the calibration buffers. Nothing in it branches
in Python on tensor values, so ``torch.jit.trace`` and the ONNX exporter can record it whole.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from adx.calibration import Calibrator
from adx.tiling import TileGrid, Tiler


class Prediction(NamedTuple):
    """Outputs for a batch of B images at the model's input size H x W."""

    image_score: Tensor  # [B] raw score
    anomaly_map: Tensor  # [B,H,W] raw map
    pred_score: Tensor  # [B] normalised, 0.5 = image threshold (NaN before calibration)
    norm_map: Tensor  # [B,H,W] normalised, 0.5 = pixel threshold
    pred_label: Tensor  # [B] bool, score >= image threshold
    pred_mask: Tensor  # [B,H,W] bool, map >= pixel threshold


OUTPUT_NAMES = tuple(Prediction._fields)


def exporting() -> bool:
    """True while a graph is being recorded (``jit.trace``, ``torch.export``, the ONNX exporter).

    Models use it to skip loops whose trip count depends on the batch (chunking that bounds memory in
    eager mode), which a graph with a dynamic batch size cannot hold.
    """
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def resize_weights(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """[n_out, n_in] rows of antialiased bilinear weights (half-pixel centres), as tensor ops only.

    The triangle filter of ``F.interpolate(..., mode="bilinear", antialias=True)``, widened by the scale when
    shrinking: output pixel i sits at ``(i + 0.5) * n_in / n_out`` and takes input pixel j with weight
    ``max(0, 1 - |j + 0.5 - centre| / max(scale, 1))``, normalised per row. Equal to torch's kernel within
    float rounding (2e-6) and exactly the identity when ``n_in == n_out``. Written without Python branches on
    sizes so that a graph exported with dynamic height and width computes it for every input size, and
    every runtime (ONNX Runtime, OpenVINO) executes the same matrix products: OpenVINO drops the antialias
    attribute of ONNX's Resize and would shrink images differently.
    """
    j = torch.arange(n_in, dtype=torch.float32, device=like.device) + 0.5
    scale = (j[-1:] + 0.5) / n_out  # n_in / n_out as a [1] tensor (no Python float from a dynamic size)
    centre = (torch.arange(n_out, dtype=torch.float32, device=like.device) + 0.5) * scale
    w = (1.0 - ((j[None, :] - centre[:, None]) / scale.clamp_min(1.0)).abs()).clamp_min(0.0)
    return (w / w.sum(1, keepdim=True)).to(like.dtype)


class Resize(nn.Module):
    """Images [B,C,h,w] -> [B,C,H,W], antialiased bilinear as two matrix products (:func:`resize_weights`)."""

    def __init__(self, size: tuple[int, int] | None) -> None:
        super().__init__()
        self.size = None if size is None else (int(size[0]), int(size[1]))

    def forward(self, images: Tensor) -> Tensor:
        if self.size is None:
            return images
        rows = resize_weights(images.shape[-2], self.size[0], images)
        cols = resize_weights(images.shape[-1], self.size[1], images)
        return torch.matmul(torch.matmul(rows, images), cols.transpose(0, 1))


class InferenceModule(nn.Module):
    """Images [B,3,H,W] in [0,1] -> :class:`Prediction` (resize, model, calibration).

    With a tile ``grid`` (:class:`adx.tiling.TileGrid`) ``size`` is its canvas and the model runs on the
    grid's tiles, its maps blended back to the canvas (:class:`adx.tiling.Tiler`).
    """

    def __init__(
        self,
        model: nn.Module,
        calibrator: Calibrator,
        size: tuple[int, int] | None,
        grid: TileGrid | None = None,
    ) -> None:
        super().__init__()
        if grid is not None:
            if size is None or tuple(size) != tuple(grid.canvas):
                raise ValueError(f"a tiled model needs its canvas {grid.canvas} as input size, got {size}")
            model = Tiler(model, grid)
        self.resize, self.model, self.calibrator = Resize(size), model, calibrator

    def forward(self, images: Tensor) -> Prediction:
        scores, maps = self.model(self.resize(images))
        return Prediction(scores, maps, *self.calibrator(scores, maps))


class ExportModule(nn.Module):
    """:class:`InferenceModule` with a plain tuple output in :data:`OUTPUT_NAMES` order (for exporters)."""

    def __init__(self, module: InferenceModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.module(image))
