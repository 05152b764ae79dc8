"""Accumulates step outputs on the CPU for epoch-end computations (gathered over ranks when distributed)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from adx.distributed import gather_table


class Collector:
    """Keeps chosen keys of step outputs (tensors moved to the CPU; lists extended)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = tuple(keys)
        self.reset()

    def reset(self) -> None:
        """Forget everything collected."""
        self.store: dict[str, list[Any]] = {k: [] for k in self.keys}

    def __len__(self) -> int:
        return sum(len(v) for v in self.store.values())

    def add(self, outputs: dict[str, Any]) -> None:
        """Append the wanted keys of one step's output dict."""
        for key in self.keys:
            if key not in outputs:
                continue
            value = outputs[key]
            if isinstance(value, Tensor):
                value = value.detach().cpu()
                self.store[key].append(value)
            else:
                self.store[key].extend(value)

    def cat(self) -> dict[str, Any]:
        """Concatenated tensors (lists stay lists) for every key that was seen."""
        return {
            k: (torch.cat(v) if v and isinstance(v[0], Tensor) else v) for k, v in self.store.items() if v
        }

    def gathered(self) -> dict[str, Any]:
        """:meth:`cat` of every rank's outputs, in rank order (a collective: every rank must call it)."""
        return gather_table(self.cat())


class OutputsCallback(Callback):
    """Routes the validation/test/predict batch-end hooks to one method, :meth:`on_outputs`.

    Subclasses implement ``on_outputs(trainer, pl_module, stage, outputs)`` with ``stage`` one of
    ``"validate"``, ``"test"``, ``"predict"`` and ignore the stages they do not serve.
    """

    def on_outputs(self, trainer: Trainer, pl_module: LightningModule, stage: str, outputs: Any) -> None:
        """Handle one batch's step outputs (a dict) of ``stage``."""

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:  # noqa: ANN001
        self.on_outputs(trainer, pl_module, "validate", outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self.on_outputs(trainer, pl_module, "test", outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self.on_outputs(trainer, pl_module, "predict", outputs)
