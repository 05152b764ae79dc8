"""Lightning adapter for STFPM: SGD on the student's feature-matching loss, one step per batch."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from adx.models.components.feature_cache import CacheMode
from adx.models.components.optim import spec
from adx.models.stfpm.torch_model import STFPMModel
from adx.models.trained import TrainedModule


class STFPM(TrainedModule):
    """STFPM (arXiv 2103.04257); model arguments are STFPMModel's, with its defaults.

    Args:
        optimizer: the paper's SGD, lr 0.4, momentum 0.9, weight decay 1e-4 (applied to the student only:
            the teacher has no trainable parameters).
        scheduler: none in the paper.
        feature_cache: keep the frozen teacher's features of the training images after the first epoch
            (``auto``: in memory up to 4 GiB, else on disk; ``off`` recomputes them every epoch).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = spec("torch.optim.SGD", lr=0.4, momentum=0.9, weight_decay=1e-4),
        scheduler: LRSchedulerCallable | None = None,
        feature_cache: CacheMode = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer, scheduler, feature_cache=feature_cache)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = STFPMModel(**kwargs)
