"""Lightning adapter for the VAE: Adam on reconstruction + beta x KL."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from adx.models.components.optim import spec
from adx.models.trained import TrainedModule
from adx.models.vae.torch_model import VAEModel


class VAE(TrainedModule):
    """Variational autoencoder; model arguments are VAEModel's, with its defaults.

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
        self.model = VAEModel(**kwargs)
