"""Every method adx ships; importing this package registers them for the CLI."""

from adx.models.base import AnomalyModule, MemoryBankModule
from adx.models.padim import Padim
from adx.models.patchcore import PatchCore

__all__ = ["AnomalyModule", "MemoryBankModule", "Padim", "PatchCore"]
