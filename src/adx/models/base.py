"""Lightning base classes shared by every method.

``AnomalyModule`` owns the calibration buffers (thresholds and normalisation statistics, so they
travel with the checkpoint) and the one post-processing path used by validation, test, predict and
export. Subclasses wrap a plain ``nn.Module`` as ``self.model`` whose ``forward(images)`` returns
``(image_scores [B], anomaly_maps [B,H,W])`` in raw units.
``MemoryBankModule`` is the adapter for training-free methods: one pass over the training images
feeds ``model.update(images)``; ``model.fit()`` runs after the last training batch.
``TrainedModule`` is the adapter for methods trained by gradient descent: it minimises
``model.loss(images)`` with the optimizer and scheduler named in the config.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

import adx
from adx.models.components.optim import build_optimizers

CHECKPOINT_FORMAT = 2
"""Layout version of adx checkpoints; 2 = backbones stored with BatchNorm folded into convolutions."""


class CheckpointError(RuntimeError):
    """A checkpoint that this adx version or this method cannot load."""


CALIBRATION_BUFFERS = (
    "image_threshold",
    "pixel_threshold",
    "image_min",
    "image_max",
    "pixel_min",
    "pixel_max",
)


class AnomalyModule(LightningModule):
    """Val/test/predict steps, calibration buffers and normalised outputs for all methods."""

    model: torch.nn.Module

    def __init__(self) -> None:
        super().__init__()
        for name in CALIBRATION_BUFFERS:
            self.register_buffer(name, torch.tensor(float("nan")))
        self.threshold_source = "none"  # where the thresholds came from; saved in the checkpoint

    # ---- calibration -------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        """True once thresholds and normalisation statistics are set."""
        return not math.isnan(float(self.image_threshold))

    def set_calibration(self, source: str, **values: float) -> None:
        """Write thresholds / min / max buffers (keys of CALIBRATION_BUFFERS) and their source."""
        for key, value in values.items():
            if key not in CALIBRATION_BUFFERS:
                raise KeyError(f"unknown calibration value {key!r}; expected one of {CALIBRATION_BUFFERS}")
            getattr(self, key).fill_(float(value))
        self.threshold_source = source

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["adx_threshold_source"] = self.threshold_source
        checkpoint["adx_format"] = CHECKPOINT_FORMAT
        checkpoint["adx_version"] = adx.__version__
        checkpoint["adx_model"] = type(self).__name__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint(checkpoint, type(self).__name__)
        self.threshold_source = checkpoint.get("adx_threshold_source", "checkpoint")

    # ---- post-processing ---------------------------------------------------------------------
    @staticmethod
    def _normalise(x: Tensor, threshold: Tensor, low: Tensor, high: Tensor) -> Tensor:
        """Min-max normalisation that maps the threshold to 0.5, clamped to [0, 1]."""
        span = (high - low).clamp_min(1e-12)
        return ((x - threshold) / span + 0.5).clamp(0.0, 1.0)

    def postprocess(self, scores: Tensor, maps: Tensor) -> dict[str, Tensor]:
        """Raw scores [B] and maps [B,H,W] -> normalised scores/maps, labels and masks (if calibrated)."""
        out = {"image_score": scores, "anomaly_map": maps}
        if self.calibrated:
            out["pred_score"] = self._normalise(scores, self.image_threshold, self.image_min, self.image_max)
            out["norm_map"] = self._normalise(maps, self.pixel_threshold, self.pixel_min, self.pixel_max)
            out["pred_label"] = scores >= self.image_threshold
            out["pred_mask"] = maps >= self.pixel_threshold
        return out

    # ---- steps -------------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any]) -> dict[str, Any]:
        scores, maps = self.model(batch["image"])
        out = self.postprocess(scores, maps)
        out.update({k: v for k, v in batch.items() if k not in out})
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        scores, maps = self.model(batch["image"])
        return {
            "image_score": scores,
            "anomaly_map": maps,
            **{k: v for k, v in batch.items() if k != "image"},
        }

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._evaluate(batch)


def check_checkpoint(
    checkpoint: dict[str, Any], model: str | None = None, source: str = "the checkpoint"
) -> None:
    """Raise CheckpointError unless ``checkpoint`` is an adx checkpoint of this format (and of ``model``)."""
    fmt, written_by = checkpoint.get("adx_format"), checkpoint.get("adx_model")
    if fmt is None:
        raise CheckpointError(
            f"{source} was not written by this version of adx (no checkpoint format; older adx releases and "
            "other tools are not readable). Re-fit the model with `adx fit`."
        )
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{source} has checkpoint format {fmt} (adx {checkpoint.get('adx_version', '?')}); this adx "
            f"{adx.__version__} reads format {CHECKPOINT_FORMAT}. Re-fit the model, or use the adx that wrote it."
        )
    if model is not None and written_by is not None and written_by != model:
        raise CheckpointError(
            f"{source} holds a {written_by} model, but the config builds {model}. Drop --config to use the "
            f"run's own config, or pass a {model} checkpoint."
        )


class MemoryBankModule(AnomalyModule):
    """Adapter for training-free methods: one epoch of ``model.update``, then ``model.fit``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> None:
        """Nothing to optimise: the model is fitted from one pass over the training images."""
        return None

    def on_train_epoch_end(self) -> None:
        if self.trainer.max_epochs != 1:
            warnings.warn(
                f"{type(self).__name__} is fitted in one pass: stopping after epoch 1 "
                f"(trainer.max_epochs is {self.trainer.max_epochs}; set it to 1 to silence this)",
                stacklevel=1,
            )
            self.trainer.should_stop = True

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.current_epoch == 0:
            self.model.update(batch["image"])
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Fit here, not in on_train_epoch_end: checkpoint callbacks run before the module's epoch-end hook.
        if self.current_epoch == 0 and batch_idx == self.trainer.num_training_batches - 1:
            self.model.fit()


class TrainedModule(AnomalyModule):
    """Adapter for methods trained by gradient descent on ``model.loss(images)`` (a scalar).

    Logs ``train/loss`` (progress bar) and, on the normal validation images, ``val/loss``, which
    ``--checkpoint.monitor val/loss`` can select the best checkpoint by. The optimizer and the optional
    scheduler come from the subclass signature (typed defaults, overridable from the config).
    """

    def __init__(self, optimizer: Any, scheduler: Any = None, scheduler_interval: str = "epoch") -> None:
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.optimizer_spec, self.scheduler_spec = optimizer, scheduler
        self.scheduler_interval = scheduler_interval

    def configure_optimizers(self) -> Any:
        out = build_optimizers(
            self.model.parameters(), self.optimizer_spec, self.scheduler_spec, self.scheduler_interval
        )
        if isinstance(out, dict):
            self._follow_trainer(out["lr_scheduler"]["scheduler"])
        return out

    def on_train_start(self) -> None:
        # A resumed run restores the scheduler's saved horizon; one that follows the trainer takes the new one.
        for config in self.trainer.lr_scheduler_configs:
            self._follow_trainer(config.scheduler)

    def _follow_trainer(self, scheduler: Any) -> None:
        """A schedule built without its own horizon (``follows_trainer``) ends at trainer.max_epochs."""
        if getattr(scheduler, "follows_trainer", False):
            scheduler.set_horizon(self.trainer.max_epochs)

    def _checked(self, loss: Tensor, stage: str) -> Tensor:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{type(self).__name__} {stage} loss is {loss.item()} at epoch {self.current_epoch}, step "
                f"{self.global_step}: lower the learning rate (--model.optimizer.lr) or check the input images."
            )
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._checked(self.model.loss(batch["image"]), "training")
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["image"])
        )
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = super().validation_step(batch, batch_idx)
        normal = torch.as_tensor(batch["label"], device=batch["image"].device) == 0
        if normal.any():
            loss = self._checked(self.model.loss(batch["image"][normal]), "validation")
            self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=int(normal.sum()))
        return out
