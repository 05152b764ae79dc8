from adx.models.stfpm.lightning_model import STFPM
from adx.models.stfpm.torch_model import STFPMModel

__all__ = ["STFPM", "STFPMModel"]
