"""Lightning adapter for DRAEM: Adam on the reconstruction + segmentation loss of synthetic anomalies."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from adx.models.components.optim import spec
from adx.models.draem.torch_model import DraemModel
from adx.models.trained import SyntheticAnomalyModule


class Draem(SyntheticAnomalyModule):
    """DRAEM (arXiv 2108.07610); model arguments are DraemModel's, with its defaults.

    Each training batch is corrupted with synthetic anomalies drawn from a generator seeded by the model's
    ``seed`` and the optimizer step, so runs (and resumed runs) reproduce. The anomaly source's provenance
    is kept in checkpoints and written to metrics.json under ``sources``.

    Args:
        optimizer: the paper's Adam, lr 1e-4.
        scheduler: lr x0.2 at 80 % and 90 % of ``trainer.max_epochs`` (the authors' training script).
    """

    has_backbone = False
    """No pretrained backbone: both networks learn from scratch (no --model.backbone / weights / pretrained)."""

    def __init__(
        self,
        optimizer: OptimizerCallable = spec("torch.optim.Adam", lr=1e-4),
        scheduler: LRSchedulerCallable | None = spec(
            "adx.models.components.optim.FractionStepLR", milestones=[0.8, 0.9], gamma=0.2
        ),
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer, scheduler, feature_cache="off")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = DraemModel(**kwargs)

    def on_fit_start(self) -> None:
        super().on_fit_start()  # checks the image / tile size (DraemModel.check_datamodule)
        self.model.anomalies()  # resolve the texture source now: a bad folder fails before any training
