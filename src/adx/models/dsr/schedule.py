"""DSR's learning-rate schedule: the main stage's drop, the upsampling stage at a constant rate."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def _constant(epoch: int) -> float:
    return 1.0


class StageStepLR(LambdaLR):
    """Param group 0 (the main stage's networks): lr x ``gamma`` from ``milestone`` of the main stage on.

    Other groups (the upsampling module) keep their lr: the authors' upsampling schedule (x0.2 at 80 % and
    90 % of the main stage's epoch count) never fires within its 50 epochs. The main stage's length comes from
    the DSR adapter (``set_horizon``, also on resume with another ``trainer.max_epochs``); per epoch.
    """

    follows_stage1 = True
    """Read by the DSR adapter: set_horizon takes the main stage's epochs, not trainer.max_epochs."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestone: float = 0.8,
        gamma: float = 0.1,
        stage1_epochs: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not 0.0 < float(milestone) <= 1.0:
            raise ValueError(
                f"milestone must be a fraction of the main stage in (0, 1], got {milestone}: "
                "e.g. --model.scheduler.milestone 0.8"
            )
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}: e.g. --model.scheduler.gamma 0.1")
        self.milestone, self.gamma = float(milestone), float(gamma)
        self.stage1_epochs: int | None = None
        if stage1_epochs is not None:
            self.set_horizon(stage1_epochs)
        lambdas = [self.factor] + [_constant] * (len(optimizer.param_groups) - 1)
        super().__init__(optimizer, lambdas, last_epoch)

    def set_horizon(self, stage1_epochs: int) -> None:
        """Set the main stage's length in epochs (the drop moves with it)."""
        if stage1_epochs is None or stage1_epochs < 1:
            raise ValueError(f"the main stage needs >= 1 epoch, got {stage1_epochs}")
        self.stage1_epochs = int(stage1_epochs)
        if hasattr(self, "base_lrs"):  # already stepping (a resumed run): this epoch's lr on the new horizon
            for group, base, fn in zip(
                self.optimizer.param_groups, self.base_lrs, self.lr_lambdas, strict=True
            ):
                group["lr"] = base * fn(self.last_epoch)
            self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def drop_epoch(self) -> int | None:
        """The 0-based epoch from which group 0 runs at lr x gamma (None before set_horizon)."""
        if self.stage1_epochs is None:
            return None
        return math.ceil(self.milestone * self.stage1_epochs - 1e-9)

    def factor(self, epoch: int) -> float:
        """Multiplier of group 0's base learning rate in ``epoch`` (0-based)."""
        drop = self.drop_epoch()
        return self.gamma if drop is not None and epoch >= drop else 1.0
