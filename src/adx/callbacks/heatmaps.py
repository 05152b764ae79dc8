"""Heatmap images for test and predict: input with ground-truth contour, heatmap overlay, predicted mask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from adx.callbacks.collect import OutputsCallback
from adx.callbacks.results import exclusive_path, run_dir
from adx.distributed import rank, world_size
from adx.visualize import panel, save_image, to_uint8_image


class HeatmapWriter(OutputsCallback):
    """Writes one panel per image under ``<run>/heatmaps/<defect_type>/`` (never overwriting).

    Maps are shown normalised by the model's calibration (0.5 = threshold); without calibration, by the
    batch's own min/max, and no predicted mask is drawn. With several processes every rank writes the
    panels of its own images into the one folder (each file is created exclusively), and ``max_images`` is
    shared out between the ranks.
    """

    def __init__(
        self,
        enabled: bool = True,
        max_images: int | None = None,
        folder: str = "heatmaps",
        format: str = "jpg",  # noqa: A002 - the user-facing option name
        quality: int = 95,
    ) -> None:
        """Heatmap panels.

        Args:
            enabled: write panels at all.
            max_images: stop after this many panels per test/predict run (None: all).
            folder: sub-folder of the run folder.
            format: ``jpg`` (default; encodes ~20x faster than PNG, ~5x smaller) or ``png`` (lossless).
            quality: JPEG quality.
        """
        if format.lower() not in ("jpg", "jpeg", "png"):
            raise ValueError(f"--heatmaps.format must be jpg or png, got {format!r}")
        self.enabled, self.max_images, self.folder = enabled, max_images, folder
        self.suffix, self.quality = "." + format.lower(), quality
        self.written = 0
        self.limit = max_images

    def _reset(self, *_: Any) -> None:
        self.written = 0
        self.limit = self.max_images
        if self.max_images is not None:  # this rank's share of the cap
            self.limit = self.max_images // world_size() + (rank() < self.max_images % world_size())

    on_test_epoch_start = _reset
    on_predict_epoch_start = _reset

    def _write(self, trainer: Trainer, outputs: dict[str, Any]) -> None:
        if not self.enabled or (self.limit is not None and self.written >= self.limit):
            return
        maps = outputs.get("norm_map")
        if maps is None:
            raw = outputs["anomaly_map"]
            lo, hi = raw.min(), raw.max()
            maps = (raw - lo) / (hi - lo).clamp_min(1e-12)
        pred = outputs.get("pred_mask")
        root = run_dir(trainer) / self.folder
        for i, path in enumerate(outputs["path"]):
            if self.limit is not None and self.written >= self.limit:
                return
            gt = outputs["mask"][i, 0].bool().cpu().numpy() if bool(outputs["has_mask"][i]) else None
            tile = panel(
                to_uint8_image(outputs["image"][i]),
                maps[i].float().cpu().numpy(),
                pred[i].cpu().numpy() if pred is not None else None,
                gt,
            )
            folder = root / str(outputs["defect_type"][i])
            folder.mkdir(parents=True, exist_ok=True)
            name = Path(path).stem + self.suffix
            while (
                True
            ):  # save_image creates the file exclusively: a name another rank took meanwhile is skipped
                try:
                    save_image(exclusive_path(folder, name), tile, quality=self.quality)
                    break
                except FileExistsError:
                    continue
            self.written += 1

    @torch.no_grad()
    def on_outputs(self, trainer: Trainer, pl_module: LightningModule, stage: str, outputs: Any) -> None:
        if stage in ("test", "predict"):
            self._write(trainer, outputs)
