"""Thresholds and normalisation statistics from the validation set, written into model buffers."""

from __future__ import annotations

import math
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from adx.callbacks.collect import Collector, OutputsCallback
from adx.distributed import rank_zero_result
from adx.metrics import f1_max, quantile_threshold
from adx.models.base import AnomalyModule

MIN_F1_IMAGES = 5
"""Fewer validation images of a class than this make an F1-optimal threshold a guess (warned)."""


class Calibration(OutputsCallback):
    """Fits image and pixel thresholds (F1-optimal, normal-score quantile, or manual) on validation outputs.

    ``auto`` picks ``f1`` when the validation set holds anomalous images and ``quantile`` otherwise.
    With ``quantile``, the image threshold is the ``quantile`` of normal image scores and the pixel
    threshold the same quantile of the per-image maxima of normal maps (so that fraction of normal images
    shows no predicted defect pixel). Min/max for normalisation come from the same validation outputs.
    With several processes, every rank's outputs are gathered and rank 0's thresholds go to every rank.
    """

    def __init__(
        self,
        method: Literal["auto", "f1", "quantile", "manual"] = "auto",
        quantile: float = 0.99,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
    ) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"calibration.quantile must be in (0, 1], got {quantile}")
        if method == "manual" and (image_threshold is None or pixel_threshold is None):
            raise ValueError(
                "calibration.method manual needs calibration.image_threshold and pixel_threshold"
            )
        self.method, self.quantile = method, quantile
        self.manual = (image_threshold, pixel_threshold)
        self.collector = Collector(keys=("image_score", "anomaly_map", "label", "mask", "has_mask"))

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.collector.reset()

    def on_outputs(self, trainer: Trainer, pl_module: LightningModule, stage: str, outputs: Any) -> None:
        if stage == "validate":
            self.collector.add(outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not isinstance(pl_module, AnomalyModule):
            return
        data = self.collector.gathered()  # every rank's validation outputs (the same on every rank)
        self.collector.reset()
        if not data:
            return
        # computed once, on rank 0, so that every rank holds exactly the same thresholds
        values = rank_zero_result(lambda: self._fit(trainer, data))
        n_normal, n_anomalous = values.pop("n_normal"), values.pop("n_anomalous")
        source, method = values.pop("source"), values.pop("method")
        self._warn_if_few(method, n_normal, n_anomalous)
        pl_module.set_calibration(source, n_normal, n_anomalous, **values)
        rank_zero_info(
            f"adx: thresholds image={values['image_threshold']:.4g} pixel={values['pixel_threshold']:.4g} "
            f"({source})"
        )

    def _fit(self, trainer: Trainer, data: dict[str, Any]) -> dict[str, Any]:
        """Thresholds, min/max, image counts, method and source from validation outputs."""
        scores, maps, labels = data["image_score"].float(), data["anomaly_map"].float(), data["label"]
        normal = labels == 0
        has_anomalies = bool((labels == 1).any())
        method = self.method if self.method != "auto" else ("f1" if has_anomalies else "quantile")
        if method == "f1" and not has_anomalies:
            raise ValueError(
                "calibration.method f1 needs anomalous validation images: set data.val_source "
                "test_split, or use calibration.method quantile"
            )
        if method == "f1":
            image_thr = f1_max(scores, labels)[1]
            gt = (labels == 0) | data["has_mask"].bool()
            pixel_thr = f1_max(maps[gt], data["mask"].squeeze(1)[gt] > 0.5)[1]
        elif method == "quantile":
            if not normal.any():
                raise ValueError("calibration.method quantile needs normal validation images")
            image_thr = quantile_threshold(scores[normal], self.quantile)
            pixel_thr = quantile_threshold(maps[normal].flatten(1).max(1).values, self.quantile)
        else:
            image_thr, pixel_thr = self.manual
        n_normal, n_anomalous = int(normal.sum()), int((labels == 1).sum())
        return {
            "image_threshold": float(image_thr),
            "pixel_threshold": float(pixel_thr),
            "image_min": float(scores.min()),
            "image_max": float(scores.max()),
            "pixel_min": float(maps.min()),
            "pixel_max": float(maps.max()),
            "n_normal": n_normal,
            "n_anomalous": n_anomalous,
            "method": method,
            "source": self._describe(trainer, method, n_normal, n_anomalous),
        }

    def _warn_if_few(self, method: str, n_normal: int, n_anomalous: int) -> None:
        """Warn when a threshold rests on too few images to mean what its name says."""
        if method == "quantile" and self.quantile < 1.0 and n_normal < math.ceil(1.0 / (1.0 - self.quantile)):
            need = math.ceil(1.0 / (1.0 - self.quantile))
            rank_zero_warn(
                f"adx: the image threshold is the {self.quantile} quantile of only {n_normal} normal validation "
                f"scores, which is (close to) their maximum; at least {need} normal images are needed for that "
                "quantile to differ from the maximum. Add normal images, raise --data.val_ratio, or lower "
                "--calibration.quantile."
            )
        if method == "f1" and min(n_normal, n_anomalous) < MIN_F1_IMAGES:
            rank_zero_warn(
                f"adx: the F1-optimal thresholds rest on {n_normal} normal and {n_anomalous} anomalous validation "
                f"images (fewer than {MIN_F1_IMAGES} of a class): expect them to move a lot with other images."
            )

    def _describe(self, trainer: Trainer, method: str, n_normal: int, n_anomalous: int) -> str:
        val_source = getattr(trainer.datamodule, "val_source", "validation")
        what = {
            "f1": "F1-optimal",
            "quantile": f"{self.quantile} quantile of normal scores",
            "manual": "manual",
        }[method]
        text = f"{what} on validation '{val_source}' ({n_normal} normal, {n_anomalous} anomalous images)"
        k_shot = getattr(trainer.datamodule, "k_shot", None)
        if getattr(trainer.lightning_module, "zero_shot", False) or k_shot == 0:
            text += "; model fitted on no normal images (zero-shot)"
        elif k_shot is not None:  # few-shot: say how little the model itself saw
            seed = getattr(trainer.datamodule, "seed", None)
            text += (
                f"; model fitted on {k_shot} normal image{'s' if k_shot != 1 else ''} (k-shot, seed {seed})"
            )
        return text


def calibration_state(pl_module: AnomalyModule) -> dict[str, Any]:
    """Thresholds, normalisation statistics, their source and image counts, for reports."""
    return pl_module.calibrator.state()


__all__ = ["Calibration", "calibration_state"]
