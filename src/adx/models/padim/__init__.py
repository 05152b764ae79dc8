from adx.models.padim.lightning_model import Padim
from adx.models.padim.torch_model import PadimModel

__all__ = ["Padim", "PadimModel"]
