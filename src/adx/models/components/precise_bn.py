"""PreciseBN (Wu and Johnson, arXiv 2105.07576): BatchNorm statistics recomputed from one pass of the data."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def recompute_batchnorm(
    module: nn.Module, batches: Iterable[dict[str, Any]], forward: Callable[[dict[str, Any]], int], name: str
) -> None:
    """Set every BatchNorm's running statistics in ``module`` to the averages over ``forward(batch)`` for all
    ``batches`` (``forward`` runs the networks on one batch and returns its image count).

    The running averages that inference uses (momentum 0.1) lag behind weights that still move fast in short
    schedules; this replaces them with the final weights' statistics. Modes and momenta are restored after;
    ``name`` (the method) goes into the error raised when there were no images.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    states = [(m, m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
        m.train()
    seen = 0
    try:
        for batch in batches:
            seen += forward(batch)
    finally:
        for m, momentum, training in states:
            m.momentum = momentum
            m.train(training)
    if seen == 0:
        raise RuntimeError(f"{name} precise_bn: no training images to compute the BatchNorm statistics from")
