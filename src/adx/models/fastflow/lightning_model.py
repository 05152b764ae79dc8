"""Lightning adapter for FastFlow: Adam on the flows' negative log-likelihood, one step per batch."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from adx.models.components.feature_cache import CacheMode
from adx.models.components.optim import spec
from adx.models.fastflow.torch_model import FastFlowModel
from adx.models.trained import TrainedModule


class FastFlow(TrainedModule):
    """FastFlow (arXiv 2111.07677); model arguments are FastFlowModel's, with its defaults.

    Args:
        optimizer: the paper's Adam, lr 1e-3, weight decay 1e-5.
        scheduler: none in the paper.
        feature_cache: keep the frozen backbone's features of the training images after the first epoch
            (``auto``: in memory up to 4 GiB, else on disk; ``off`` recomputes them every epoch).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = spec("torch.optim.Adam", lr=1e-3, weight_decay=1e-5),
        scheduler: LRSchedulerCallable | None = None,
        feature_cache: CacheMode = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer, scheduler, feature_cache=feature_cache)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = FastFlowModel(**kwargs)
