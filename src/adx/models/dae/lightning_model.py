"""Lightning adapter for the denoising autoencoder: Adam on the error of restoring corrupted images."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from adx.models.components.optim import spec
from adx.models.dae.torch_model import DAEModel
from adx.models.trained import TrainedModule


class DAE(TrainedModule):
    """Denoising autoencoder; model arguments are DAEModel's, with its defaults.

    Args:
        optimizer: Bergmann et al.'s Adam for their autoencoders, lr 2e-4, weight decay 1e-5.
        scheduler: none.
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
        self.model = DAEModel(**kwargs)
