"""Lightning adapter for PaDiM: one pass accumulates Gaussian moments, then inverts covariances."""

from __future__ import annotations

from typing import Any

from adx.models.base import MemoryBankModule
from adx.models.padim.torch_model import PadimModel


class Padim(MemoryBankModule):
    """PaDiM (arXiv 2011.08785); every argument is PadimModel's, with its defaults."""

    needs_tile_training = True  # a Gaussian per position of the grid it was fitted on

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = PadimModel(**kwargs)
