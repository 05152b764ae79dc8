"""Optimizer and scheduler specs: typed defaults in signatures, overridable from the config.

Trained methods take ``optimizer: OptimizerCallable`` and ``scheduler: LRSchedulerCallable | None``.
The defaults are ``{"class_path": ..., "init_args": {...}}`` dicts, so the paper's values are visible in
the signature, in ``--print_config`` and in the saved config.yaml, and single values can be overridden
(``--model.optimizer.lr 0.0005``) or the class swapped (``--model.optimizer torch.optim.SGD``). The CLI
turns a spec into a callable; in Python, :func:`build` accepts either form.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR


def spec(class_path: str, **init_args: Any) -> dict[str, Any]:
    """A ``{"class_path", "init_args"}`` default for an optimizer or scheduler argument."""
    return {"class_path": class_path, "init_args": dict(init_args)}


def _resolve(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"cannot import {class_path!r}: give a full class path such as torch.optim.Adam"
        ) from exc


def build(spec_or_callable: Callable[..., Any] | Mapping[str, Any], *args: Any) -> Any:
    """Instantiate ``spec_or_callable`` (a callable, or a class_path/init_args dict) with ``args``."""
    if isinstance(spec_or_callable, Mapping):
        if "class_path" not in spec_or_callable:
            raise ValueError(f"optimizer/scheduler spec needs a class_path, got {dict(spec_or_callable)}")
        cls = _resolve(str(spec_or_callable["class_path"]))
        return cls(*args, **dict(spec_or_callable.get("init_args") or {}))
    if not callable(spec_or_callable):
        raise TypeError(f"expected a callable or a class_path spec, got {type(spec_or_callable).__name__}")
    return spec_or_callable(*args)


def build_optimizers(
    params: Iterable[torch.nn.Parameter] | Iterable[Mapping[str, Any]],
    optimizer: Callable[..., Any] | Mapping[str, Any],
    scheduler: Callable[..., Any] | Mapping[str, Any] | None,
    scheduler_interval: str = "epoch",
) -> Any:
    """``configure_optimizers`` return value for ``params``: parameters, or parameter groups (dicts with
    ``params`` and per-group options such as ``lr``); parameters that do not require gradients are left out."""
    items = list(params)
    if items and isinstance(items[0], Mapping):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
        chosen: list[Any] = [g for g in groups if g["params"]]
    else:
        chosen = [p for p in items if p.requires_grad]
    if not chosen:
        raise RuntimeError("no trainable parameters: this method's model has nothing to optimise")
    opt = build(optimizer, chosen)
    if scheduler is None:
        return opt
    return {
        "optimizer": opt,
        "lr_scheduler": {"scheduler": build(scheduler, opt), "interval": scheduler_interval},
    }


class FractionStepLR(LambdaLR):
    """lr x ``gamma`` at each milestone, milestones given as fractions of the training length; per epoch.

    DRAEM's schedule (authors' training script): x0.2 at 80 % and 90 % of the epochs. Milestone f takes
    effect from epoch ceil(f * max_epochs) (0-based), so a 700-epoch run drops at epochs 560 and 630.
    ``max_epochs`` None follows the trainer: adx calls :meth:`set_horizon` with ``trainer.max_epochs``,
    also when a run is resumed with another length (the drops move with it).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Sequence[float] = (0.8, 0.9),
        gamma: float = 0.2,
        max_epochs: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not all(0.0 < float(f) <= 1.0 for f in milestones):
            raise ValueError(
                f"milestones must be fractions of the training length in (0, 1], got {list(milestones)}: "
                "e.g. --model.scheduler.milestones [0.8,0.9]"
            )
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}: e.g. --model.scheduler.gamma 0.2")
        self.milestones, self.gamma = sorted(float(f) for f in milestones), float(gamma)
        self.max_epochs: int | None = None
        self.follows_trainer = max_epochs is None
        if max_epochs is not None:
            self.set_horizon(max_epochs)
        super().__init__(optimizer, self.factor, last_epoch)

    def set_horizon(self, max_epochs: int) -> None:
        """Set the training length the milestones are fractions of (adx passes trainer.max_epochs)."""
        if max_epochs is None or max_epochs < 1:
            raise ValueError(
                f"max_epochs must be >= 1, got {max_epochs}: set --trainer.max_epochs or "
                "--model.scheduler.max_epochs"
            )
        self.max_epochs = int(max_epochs)
        if hasattr(self, "base_lrs"):  # already stepping (a resumed run): this epoch's lr on the new horizon
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * self.factor(self.last_epoch)
            self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def milestone_epochs(self) -> list[int]:
        """The 0-based epochs from which each drop applies."""
        if self.max_epochs is None:
            return []
        return [math.ceil(f * self.max_epochs - 1e-9) for f in self.milestones]

    def factor(self, epoch: int) -> float:
        """Multiplier of the base learning rate in ``epoch`` (0-based)."""
        if self.max_epochs is None:
            if epoch > 0:
                raise RuntimeError("FractionStepLR has no max_epochs: set --model.scheduler.max_epochs")
            return 1.0
        return self.gamma ** sum(epoch >= m for m in self.milestone_epochs())
