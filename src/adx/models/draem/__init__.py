from adx.models.draem.lightning_model import Draem
from adx.models.draem.torch_model import DraemModel

__all__ = ["Draem", "DraemModel"]
