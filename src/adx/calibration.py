"""Calibration as a module: thresholds and normalisation statistics in buffers, applied without branches.

``Calibrator`` holds what the validation outputs taught a fitted model: the image and pixel thresholds
and the min/max of scores and maps used to normalise them. Its ``forward`` is pure tensor arithmetic (an
uncalibrated model gives NaN scores and False labels rather than a Python branch), so it traces and
exports with the model. Where the thresholds came from (a sentence, plus the image counts) is kept as
the module's extra state, so it travels in the state dict and in exports.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

CALIBRATION_BUFFERS = (
    "image_threshold",
    "pixel_threshold",
    "image_min",
    "image_max",
    "pixel_min",
    "pixel_max",
)


def normalise(x: Tensor, threshold: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Min-max normalisation that maps the threshold to 0.5, clamped to [0, 1]."""
    span = (high - low).clamp_min(1e-12)
    return ((x - threshold) / span + 0.5).clamp(0.0, 1.0)


class Calibrator(nn.Module):
    """Raw scores [B] and maps [B,H,W] -> (pred_score [B], norm_map [B,H,W], pred_label [B], pred_mask [B,H,W])."""

    def __init__(self) -> None:
        super().__init__()
        for name in CALIBRATION_BUFFERS:
            self.register_buffer(name, torch.tensor(float("nan")))
        self.source = "none"  # where the thresholds came from, in words
        self.n_normal, self.n_anomalous = 0, 0  # validation images behind them

    @property
    def calibrated(self) -> bool:
        """True once thresholds and normalisation statistics are set (host-side check, not traced)."""
        return not math.isnan(float(self.image_threshold))

    def set(self, source: str, n_normal: int = 0, n_anomalous: int = 0, **values: float | Tensor) -> None:
        """Write thresholds / min / max (keys of CALIBRATION_BUFFERS), their source and image counts."""
        for key, value in values.items():
            if key not in CALIBRATION_BUFFERS:
                raise KeyError(f"unknown calibration value {key!r}; expected one of {CALIBRATION_BUFFERS}")
            getattr(self, key).fill_(float(value))
        self.source, self.n_normal, self.n_anomalous = source, int(n_normal), int(n_anomalous)

    def state(self) -> dict[str, Any]:
        """Thresholds, statistics, source and counts as plain values (for reports and export metadata)."""
        out: dict[str, Any] = {k: float(getattr(self, k)) for k in CALIBRATION_BUFFERS}
        out.update(source=self.source, n_normal=self.n_normal, n_anomalous=self.n_anomalous)
        return out

    def get_extra_state(self) -> dict[str, Any]:
        return {"source": self.source, "n_normal": self.n_normal, "n_anomalous": self.n_anomalous}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict):
            self.source = str(state.get("source", "checkpoint"))
            self.n_normal = int(state.get("n_normal", 0))
            self.n_anomalous = int(state.get("n_anomalous", 0))

    def forward(self, scores: Tensor, maps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pred_score = normalise(scores, self.image_threshold, self.image_min, self.image_max)
        norm_map = normalise(maps, self.pixel_threshold, self.pixel_min, self.pixel_max)
        return pred_score, norm_map, scores >= self.image_threshold, maps >= self.pixel_threshold
