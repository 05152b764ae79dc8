"""Every method adx ships; importing this package registers them for the CLI."""

from adx.models.base import AnomalyModule, MemoryBankModule
from adx.models.padim import Padim
from adx.models.patchcore import PatchCore

__all__ = ["MODELS", "AnomalyModule", "MemoryBankModule", "Padim", "PatchCore"]

MODELS: dict[str, type[AnomalyModule]] = {"PatchCore": PatchCore, "Padim": Padim}
"""Every method by class name; contract tests are parametrised over it."""
