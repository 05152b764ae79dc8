from adx.models.dsr.lightning_model import DSR
from adx.models.dsr.torch_model import DSRModel

__all__ = ["DSR", "DSRModel"]
