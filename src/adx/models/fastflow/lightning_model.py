"""Lightning adapter for FastFlow: Adam on the flows' negative log-likelihood, one step per batch."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from adx.models.base import TrainedModule
from adx.models.components.optim import spec
from adx.models.fastflow.torch_model import FastFlowModel


class FastFlow(TrainedModule):
    """FastFlow (arXiv 2111.07677); model arguments are FastFlowModel's, with its defaults.

    Args:
        optimizer: the paper's Adam, lr 1e-3, weight decay 1e-5.
        scheduler: none in the paper.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = spec("torch.optim.Adam", lr=1e-3, weight_decay=1e-5),
        scheduler: LRSchedulerCallable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = FastFlowModel(**kwargs)

    def on_train_epoch_start(self) -> None:
        self.model.begin_map_reference()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.model.trained_steps += 1
        # the epoch's maps become the reference before validation and checkpointing see the model
        if batch_idx == self.trainer.num_training_batches - 1:
            self.model.end_map_reference()
