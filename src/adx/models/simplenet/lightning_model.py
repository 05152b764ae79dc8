"""Lightning adapter for SimpleNet: one Adam step per batch on the adaptor and discriminator together."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from adx.models.components.feature_cache import CacheMode
from adx.models.components.optim import spec
from adx.models.simplenet.torch_model import SimpleNetModel
from adx.models.trained import SeededStepModule


class SimpleNet(SeededStepModule):
    """SimpleNet (arXiv 2303.15140); model arguments are SimpleNetModel's, with its defaults.

    Each training step draws fresh Gaussian noise from generators seeded by the model's ``seed``, the optimizer
    step and the image's place in the batch, so runs and resumed runs reproduce. ``train/p_true`` and
    ``train/p_fake`` log the share of normal features scored above the margin and of noisy ones below it.

    Args:
        optimizer: the paper's Adam, lr 2e-4 (the discriminator's) and weight decay 1e-5.
        adaptor_lr: the feature adaptor's learning rate, a parameter group of the same optimizer (paper: 1e-4);
            None: the optimizer's lr.
        scheduler: none in the paper.
        feature_cache: keep the frozen backbone's maps of the training images after the first epoch
            (``auto``: in memory up to 4 GiB, else on disk; ``off`` recomputes them every epoch).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = spec("torch.optim.Adam", lr=2e-4, weight_decay=1e-5),
        adaptor_lr: float | None = 1e-4,
        scheduler: LRSchedulerCallable | None = None,
        feature_cache: CacheMode = "auto",
        **kwargs: Any,
    ) -> None:
        if adaptor_lr is not None and not adaptor_lr > 0:
            raise ValueError(
                f"adaptor_lr must be > 0 or null, got {adaptor_lr}: use e.g. --model.adaptor_lr 0.0001"
            )
        super().__init__(optimizer, scheduler, feature_cache=feature_cache)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.adaptor_lr = adaptor_lr
        self.model = SimpleNetModel(**kwargs)

    def parameter_groups(self) -> Any:
        """One optimizer, two parameter groups: the adaptor (``adaptor_lr``) and the discriminator."""
        adaptor: dict[str, Any] = {"params": list(self.model.adaptor.parameters())}
        if self.adaptor_lr is not None:
            adaptor["lr"] = self.adaptor_lr
        return [adaptor, {"params": list(self.model.discriminator.parameters())}]
