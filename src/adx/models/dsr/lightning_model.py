"""Lightning adapter for DSR: VQ-VAE first (file, cache or training), then two stages chosen by epoch."""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from adx.models.components.optim import spec
from adx.models.dsr.torch_model import DSRModel
from adx.models.trained import SyntheticAnomalyModule


class DSR(SyntheticAnomalyModule):
    """DSR (arXiv 2208.01521); model arguments are DSRModel's, with its defaults.

    One ``adx fit`` does it all: at fit start the VQ-VAE is loaded (``vq_weights``), taken from the machine's
    cache or trained (``vq_source``); then epochs before ``(1 - upsampling_fraction) x max_epochs`` train the
    main stage (subspace restriction, object-specific decoder, anomaly detection module) and the rest the
    upsampling module. One Adam holds both stages' parameters in two groups; a stage's loss reaches only its
    own group, so the other group takes no step (Adam skips parameters without gradients).

    Args:
        optimizer: the authors' Adam, lr 2e-4 (both stages).
        scheduler: lr x0.1 at 80 % of the main stage (authors' MultiStepLR); the upsampling stage constant.
    """

    has_backbone = False
    """No pretrained backbone: the VQ-VAE is trained by adx or read from --model.vq_weights."""

    def __init__(
        self,
        optimizer: OptimizerCallable = spec("torch.optim.Adam", lr=2e-4),
        scheduler: LRSchedulerCallable | None = spec(
            "adx.models.dsr.schedule.StageStepLR", milestone=0.8, gamma=0.1
        ),
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer, scheduler, feature_cache="off")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = DSRModel(**kwargs)

    def parameter_groups(self) -> Any:
        """Stage 1's networks, then the upsampling module's (a stage-1 schedule may act on the first group)."""
        return [{"params": self.model.stage1_parameters()}, {"params": self.model.stage2_parameters()}]

    def _follow_trainer(self, scheduler: Any) -> None:
        if getattr(scheduler, "follows_stage1", False):
            scheduler.set_horizon(self.model.stage1_epochs(self.trainer.max_epochs))
        else:
            super()._follow_trainer(scheduler)

    def on_fit_start(self) -> None:
        super().on_fit_start()  # checks the image / tile size (DSRModel.check_datamodule)
        self.model.stage1_epochs(self.trainer.max_epochs)  # two stages need >= 2 epochs: say so before work
        self.model.smudges()  # resolve the texture folder now, if any: a bad one fails before training
        dm = self.trainer.datamodule
        category = {
            "category": getattr(dm, "category", None),
            "images": len(getattr(dm, "train_samples", ())),
        }
        self.model.prepare_vq(
            self.device,
            category_batches=dm.train_dataloader if dm is not None else None,
            category=category,
            num_workers=int(getattr(dm, "num_workers", 0)),
        )

    def on_train_epoch_start(self) -> None:
        stage = self.model.stage_of(self.current_epoch, self.trainer.max_epochs)
        if stage != self.model.stage or self.current_epoch == 0:
            print(
                f"adx: DSR stage {stage} ({'main' if stage == 1 else 'upsampling module'}) "
                f"from epoch {self.current_epoch}",
                file=sys.stderr,
            )
        self.model.stage = stage
