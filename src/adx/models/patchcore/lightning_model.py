"""Lightning adapter for PatchCore: one pass collects patch features, the coreset builds the bank."""

from __future__ import annotations

from typing import Any

from adx.models.base import MemoryBankModule
from adx.models.patchcore.torch_model import PatchCoreModel


class PatchCore(MemoryBankModule):
    """PatchCore (arXiv 2106.08265); every argument is PatchCoreModel's, with its defaults."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = PatchCoreModel(**kwargs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # image paths order the pool, so the bank does not depend on shuffling or on the number of processes
        if self.current_epoch == 0:
            self.model.update(batch["image"], keys=batch.get("path"))
        return None
