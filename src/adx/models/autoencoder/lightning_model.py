"""Lightning adapter for the convolutional AutoEncoder: Adam on the reconstruction error."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from adx.models.autoencoder.torch_model import AutoEncoderModel
from adx.models.components.optim import spec
from adx.models.trained import TrainedModule


class AutoEncoder(TrainedModule):
    """Convolutional autoencoder (arXiv 1807.02011); model arguments are AutoEncoderModel's, with its defaults.

    Args:
        optimizer: the paper's Adam, lr 2e-4, weight decay 1e-5.
        scheduler: none in the paper.
    """

    has_backbone = False  # learns from scratch: no backbone, strides or pretrained weights

    def __init__(
        self,
        optimizer: OptimizerCallable = spec("torch.optim.Adam", lr=2e-4, weight_decay=1e-5),
        scheduler: LRSchedulerCallable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = AutoEncoderModel(**kwargs)
