"""Lightning adapter for Reverse Distillation: Adam on the student's cosine loss, one step per batch."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from adx.models.components.feature_cache import CacheMode
from adx.models.components.optim import spec
from adx.models.reverse_distillation.torch_model import ReverseDistillationModel
from adx.models.trained import TrainedModule


class ReverseDistillation(TrainedModule):
    """Reverse Distillation (arXiv 2201.10703); model arguments are ReverseDistillationModel's, with its defaults.

    Only the one-class bottleneck and the student decoder train; the teacher stays frozen, so its maps of the
    training images are computed once and read from the frozen-feature cache in later epochs.

    Args:
        optimizer: the paper's Adam, lr 0.005, betas (0.5, 0.999), no weight decay.
        scheduler: none in the paper.
        feature_cache: keep the frozen teacher's maps of the training images after the first epoch
            (``auto``: in memory up to 4 GiB, else on disk; ``off`` recomputes them every epoch).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = spec("torch.optim.Adam", lr=0.005, betas=(0.5, 0.999)),
        scheduler: LRSchedulerCallable | None = None,
        feature_cache: CacheMode = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer, scheduler, feature_cache=feature_cache)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = ReverseDistillationModel(**kwargs)
