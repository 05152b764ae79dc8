"""Optimizer and scheduler specs: typed defaults in signatures, overridable from the config.

Trained methods take ``optimizer: OptimizerCallable`` and ``scheduler: LRSchedulerCallable | None``.
The defaults are ``{"class_path": ..., "init_args": {...}}`` dicts, so the paper's values are visible in
the signature, in ``--print_config`` and in the saved config.yaml, and single values can be overridden
(``--model.optimizer.lr 0.0005``) or the class swapped (``--model.optimizer torch.optim.SGD``). The CLI
turns a spec into a callable; in Python, :func:`build` accepts either form.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch


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
    params: Iterable[torch.nn.Parameter],
    optimizer: Callable[..., Any] | Mapping[str, Any],
    scheduler: Callable[..., Any] | Mapping[str, Any] | None,
    scheduler_interval: str = "epoch",
) -> Any:
    """``configure_optimizers`` return value for ``params``."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: this method's model has nothing to optimise")
    opt = build(optimizer, params)
    if scheduler is None:
        return opt
    return {
        "optimizer": opt,
        "lr_scheduler": {"scheduler": build(scheduler, opt), "interval": scheduler_interval},
    }
