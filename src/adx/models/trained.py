"""Lightning adapter for methods trained by gradient descent, with the plug points they share.

- ``model.loss(batch)`` gets the whole batch dict: images plus whatever the data module adds (masks,
  augmented views, synthetic anomalies, penalty images) and, with the frozen-feature cache, the
  backbone's ``features`` (a list of [B,C,h,w]).
- Frozen-feature cache: a model that defines ``frozen_features(images) -> list[Tensor]`` (its frozen,
  deterministic part) has them computed once per training image and read from the cache in later epochs,
  when its backbone is frozen and the data module does not augment training images.
- Reference statistics: a model that defines ``fit_reference(batches)`` gets, after the last training
  batch of every epoch (so validation and checkpoints see a consistent model), one pass over the normal
  training images with the current weights, in eval mode and without gradients.
- Several optimizers or stages: set ``automatic_optimization = False`` in the adapter and take the steps
  in ``training_step`` (CFlow does, one step per fibre batch), with ``configure_optimizers`` returning
  several optimizers where a method needs them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from adx.models.base import AnomalyModule, select
from adx.models.components.feature_cache import CacheMode, FeatureCache
from adx.models.components.optim import build_optimizers
from adx.tiling import TILE_BATCH, cut_batch


class TrainedModule(AnomalyModule):
    """Adapter for methods trained on ``model.loss(batch)`` (a scalar).

    Logs ``train/loss`` (progress bar) and, on the normal validation images, ``val/loss``, which
    ``--checkpoint.monitor val/loss`` can select the best checkpoint by. The optimizer and the optional
    scheduler come from the subclass signature (typed defaults, overridable from the config).
    """

    def __init__(
        self,
        optimizer: Any,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        feature_cache: CacheMode = "auto",
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        if feature_cache not in ("auto", "memory", "disk", "off"):
            raise ValueError(
                f"feature_cache must be auto, memory, disk or off, got {feature_cache!r}: "
                "fix --model.feature_cache"
            )
        self.optimizer_spec, self.scheduler_spec = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        self.feature_cache_mode = feature_cache
        self.cache: FeatureCache | None = None
        self._reference_loader: Any = None

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        out = build_optimizers(
            self.parameter_groups(), self.optimizer_spec, self.scheduler_spec, self.scheduler_interval
        )
        if isinstance(out, dict):
            self._follow_trainer(out["lr_scheduler"]["scheduler"])
        return out

    def parameter_groups(self) -> Any:
        """What the optimizer trains: the model's parameters, or parameter groups (dicts with ``params`` and
        options such as ``lr``) in methods whose parts train at different rates."""
        return self.model.parameters()

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

    # ---- frozen-feature cache ----------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.cache = self._make_cache()

    def on_fit_end(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        self._reference_loader = None

    def _make_cache(self) -> FeatureCache | None:
        if self.feature_cache_mode == "off" or not hasattr(self.model, "frozen_features"):
            return None
        backbone = getattr(self.model, "backbone", None)
        parameters = getattr(backbone, "parameters", None)  # EfficientAD's is a card (its teacher is frozen)
        if parameters is not None and any(p.requires_grad for p in parameters()):
            return None  # a trainable backbone changes its features every step
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(dm, "train_augmented", False):
            return None  # augmented training images differ every epoch
        n = len(getattr(dm, "train_samples", ())) + len(getattr(dm, "val_samples", ()))
        n *= int(getattr(dm, "tiles_per_image", 1))  # one cache entry per tile when training on tiles
        return FeatureCache(self.feature_cache_mode, expected_images=n)

    def with_features(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with ``features`` added (from the cache, or computed and cached) when caching is on."""
        if self.cache is None or "path" not in batch:
            return batch
        feats = self.cache.get(batch["path"], batch["image"].device)
        if feats is None:
            with torch.no_grad():
                feats = self.model.frozen_features(batch["image"])
            self.cache.put(batch["path"], feats)
        return {**batch, "features": feats}

    # ---- reference statistics ----------------------------------------------------------------
    def fit_reference(self) -> None:
        """One pass over the normal training images with the current weights (models with ``fit_reference``)."""
        fit = getattr(self.model, "fit_reference", None)
        if fit is None:
            return
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            fit(self._reference_batches())
        self.model.train(was_training)

    def _reference_batches(self) -> Iterator[dict[str, Any]]:
        if self._reference_loader is None:
            dm = self.trainer.datamodule
            if hasattr(dm, "reference_dataloader"):
                self._reference_loader = dm.reference_dataloader()
            else:
                self._reference_loader = self.trainer.train_dataloader
        for batch in self._reference_loader:
            moved = {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            yield self.with_features(moved)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        steps = getattr(self.model, "trained_steps", None)
        if isinstance(steps, Tensor):
            steps += 1  # models that refuse to score untrained (check_fitted) count their steps here
        if batch_idx == self.trainer.num_training_batches - 1:
            self.fit_reference()

    # ---- steps -------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._checked(self.model.loss(self.with_features(batch)), "training")
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["image"])
        )
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = super().validation_step(batch, batch_idx)
        normal = torch.as_tensor(batch["label"], device=batch["image"].device) == 0
        if normal.any():
            grid = self.tile_grid
            if grid is not None and getattr(self.trainer.datamodule, "train_on_tiles", False):
                loss = self._tile_loss(cut_batch(select(batch, normal), grid))
            else:
                loss = self.model.loss(select(self.with_features(batch), normal))
            loss = self._checked(loss, "validation")
            self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=int(normal.sum()))
        return out

    def _tile_loss(self, tiles: dict[str, Any]) -> Tensor:
        """The loss over the tiles of the normal validation canvases (the scale training sees), in chunks.

        Losses are batch means, so the tile-weighted mean of the chunks' losses is the loss of all tiles.
        """
        n, total = len(tiles["image"]), 0.0
        for start in range(0, n, TILE_BATCH):
            keep = torch.zeros(n, dtype=torch.bool, device=tiles["image"].device)
            keep[start : start + TILE_BATCH] = True
            chunk = self.with_features(select(tiles, keep))
            total = total + self.model.loss(chunk) * int(keep.sum())
        return total / n

    def on_train_epoch_end(self) -> None:
        if self.cache is not None and self.current_epoch == 0:
            where = self.cache.where
            print(f"adx: frozen features cached in {where} for the next epochs", file=sys.stderr)


class SeededStepModule(TrainedModule):
    """A TrainedModule whose torch model draws random data in its loss (SimpleNet's noise, DRAEM's anomalies).

    The model reads ``anomaly_step`` and ``anomaly_rank`` from the batch to seed each step's draws (runs and
    resumed runs reproduce, DDP ranks differ) and exposes per-term losses as ``loss_terms`` (logged per epoch).
    """

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        batch = {**batch, "anomaly_step": self.global_step, "anomaly_rank": self.global_rank}
        loss = super().training_step(batch, batch_idx)
        for name, value in self.model.loss_terms.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=len(batch["image"]))
        return loss


class SyntheticAnomalyModule(SeededStepModule):
    """A SeededStepModule whose model also trains on data besides the images (DRAEM's and DSR's anomaly
    sources, EfficientAD's teacher and penalty images) and says where it came from with ``data_sources()`` /
    ``restore_sources()`` (components/provenance.RecordsSources): that record travels in every checkpoint
    (metrics.json gets it through the ResultsWriter).
    """

    SOURCES_KEY = "adx_data_sources"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[self.SOURCES_KEY] = self.model.data_sources()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.model.restore_sources(checkpoint.get(self.SOURCES_KEY) or {})
