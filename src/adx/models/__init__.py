"""Every method adx ships; importing this package registers them for the CLI."""

from adx.models.base import AnomalyModule, MemoryBankModule, ZeroShotModule
from adx.models.cflow import CFlow
from adx.models.fastflow import FastFlow
from adx.models.padim import Padim
from adx.models.patchcore import PatchCore
from adx.models.trained import TrainedModule

__all__ = [
    "MODELS",
    "AnomalyModule",
    "CFlow",
    "FastFlow",
    "MemoryBankModule",
    "Padim",
    "PatchCore",
    "TrainedModule",
    "ZeroShotModule",
]

MODELS: dict[str, type[AnomalyModule]] = {
    "PatchCore": PatchCore,
    "Padim": Padim,
    "FastFlow": FastFlow,
    "CFlow": CFlow,
}
"""Every method by class name; contract tests are parametrised over it."""
