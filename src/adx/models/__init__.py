"""Every method adx ships; importing this package registers them for the CLI."""

from adx.models.autoencoder import AutoEncoder
from adx.models.base import AnomalyModule, MemoryBankModule, ZeroShotModule
from adx.models.cflow import CFlow
from adx.models.dae import DAE
from adx.models.draem import Draem
from adx.models.dsr import DSR
from adx.models.efficient_ad import EfficientAd
from adx.models.fastflow import FastFlow
from adx.models.ganomaly import GANomaly
from adx.models.padim import Padim
from adx.models.patchcore import PatchCore
from adx.models.reverse_distillation import ReverseDistillation
from adx.models.simplenet import SimpleNet
from adx.models.stfpm import STFPM
from adx.models.trained import TrainedModule
from adx.models.vae import VAE

__all__ = [
    "MODELS",
    "AnomalyModule",
    "AutoEncoder",
    "CFlow",
    "DAE",
    "DSR",
    "Draem",
    "EfficientAd",
    "FastFlow",
    "GANomaly",
    "MemoryBankModule",
    "Padim",
    "PatchCore",
    "ReverseDistillation",
    "STFPM",
    "SimpleNet",
    "TrainedModule",
    "VAE",
    "ZeroShotModule",
]

MODELS: dict[str, type[AnomalyModule]] = {
    "PatchCore": PatchCore,
    "Padim": Padim,
    "FastFlow": FastFlow,
    "CFlow": CFlow,
    "AutoEncoder": AutoEncoder,
    "DAE": DAE,
    "VAE": VAE,
    "Draem": Draem,
    "GANomaly": GANomaly,
    "DSR": DSR,
    "STFPM": STFPM,
    "ReverseDistillation": ReverseDistillation,
    "SimpleNet": SimpleNet,
    "EfficientAd": EfficientAd,
}
"""Every method by class name; contract tests are parametrised over it."""
