"""Lightning adapter for EfficientAD: teacher at fit start, Adam on student + autoencoder, map quantiles per epoch."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from adx.models.components.feature_cache import CacheMode
from adx.models.components.optim import spec
from adx.models.efficient_ad.torch_model import EfficientAdModel
from adx.models.trained import SyntheticAnomalyModule


class EfficientAd(SyntheticAnomalyModule):
    """EfficientAD (arXiv 2303.14535); model arguments are EfficientAdModel's, with its defaults.

    At fit start the teacher is read (``teacher_weights``), taken from the machine's cache or distilled, and
    its per-channel statistics are measured on the training images. After the last batch of every epoch the
    maps' quantiles are measured on the held-out normal validation images (the training images when there are
    none), so validation, thresholds and checkpoints see the normalisation the model will test with. The
    teacher's provenance travels in the checkpoint and the export metadata (``data_sources``).

    Args:
        optimizer: the paper's Adam, lr 1e-4, weight decay 1e-5 (student and autoencoder; the teacher is frozen).
        scheduler: lr x0.1 after 95 % of the training (the paper: of 70 000 steps; here of trainer.max_epochs).
        feature_cache: keep the frozen teacher's maps of the training images after the first epoch (``auto``:
            in memory up to 4 GiB, else in a temporary folder; 6.3 MB per 256 px image); the autoencoder's
            colour-jittered images still go through the teacher every step. ``off`` recomputes them.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = spec("torch.optim.Adam", lr=1e-4, weight_decay=1e-5),
        scheduler: LRSchedulerCallable | None = spec(
            "adx.models.components.optim.FractionStepLR", milestones=[0.95], gamma=0.1
        ),
        feature_cache: CacheMode = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer, scheduler, feature_cache=feature_cache)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = EfficientAdModel(**kwargs)

    def on_fit_start(self) -> None:
        super().on_fit_start()  # checks the image / tile size (EfficientAdModel.check_datamodule)
        dm = self.trainer.datamodule
        size = tuple(getattr(dm, "image_size", None) or (256, 256))
        grid = getattr(dm, "tiling", None)
        self.model.penalty_source(tuple(grid.tile) if grid is not None else size)  # a bad folder fails now
        self.model.prepare_teacher(self.device)
        if not int(self.model.stats_ready):
            self.model.fit_teacher_stats(self._images(dm.reference_dataloader()))

    def fit_reference(self) -> None:
        """The maps' quantiles on held-out normal images, with the current weights (after each epoch)."""
        loader, source = self.trainer.datamodule.held_out_normal_dataloader()
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            n = self.model.fit_map_quantiles(self._images(loader))
        self.model.train(was_training)
        self.model.record_quantiles({"source": source, "images": n, "epoch": int(self.current_epoch)})

    def _images(self, loader: Any) -> Iterator[Tensor]:
        for batch in loader:
            yield batch["image"].to(self.device)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 0:
            record = self.model.data_sources().get("teacher", {})
            print(f"adx: EfficientAD teacher: {self.model.backbone.weights_source}", file=sys.stderr)
            if record.get("kind") == "distilled" and record.get("reused") is False:
                print(f"adx: distillation took {record.get('seconds')} s", file=sys.stderr)
