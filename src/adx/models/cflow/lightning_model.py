"""Lightning adapter for CFLOW-AD: manual optimisation, one optimizer step per fibre batch."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from adx.models.cflow.torch_model import CFlowModel
from adx.models.components.feature_cache import CacheMode
from adx.models.components.optim import spec
from adx.models.trained import TrainedModule


class CFlow(TrainedModule):
    """CFLOW-AD (arXiv 2107.12571); model arguments are CFlowModel's, with its defaults.

    Each image batch yields several optimizer steps (the paper's fibre batches), so Lightning's automatic
    optimisation (one step per batch) is off; the optimizer and scheduler still come from the config.
    An epoch-interval scheduler is stepped after every epoch, a step-interval one after every image batch.

    Args:
        optimizer: the paper's Adam, lr 2e-4.
        scheduler: none by default; the authors' warm-up + cosine schedule is
            ``adx.models.components.flows.WarmupCosineLR`` (see configs/cflow/bottle.yaml).
        feature_cache: keep the frozen encoder's maps of the training images after the first epoch
            (``auto``: in memory up to 4 GiB, else on disk; ``off`` recomputes them every epoch).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = spec("torch.optim.Adam", lr=2e-4),
        scheduler: LRSchedulerCallable | None = None,
        feature_cache: CacheMode = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer, scheduler, feature_cache=feature_cache)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = CFlowModel(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        sums: dict[int, Tensor] = {}
        counts: dict[int, int] = {}
        for scale, loss, n in self.model.fibre_batches(self.with_features(batch)):
            self._checked(loss, "training")
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            sums[scale] = sums.get(scale, 0.0) + loss.detach() * n
            counts[scale] = counts.get(scale, 0) + n
        total = torch.stack([sums[s] / counts[s] for s in sums]).sum()
        self.log(
            "train/loss", total, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["image"])
        )
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.scheduler_interval == "step":
            scheduler.step()
        return total

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.scheduler_interval == "epoch":
            scheduler.step()
