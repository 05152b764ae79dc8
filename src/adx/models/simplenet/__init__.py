from adx.models.simplenet.lightning_model import SimpleNet
from adx.models.simplenet.torch_model import SimpleNetModel

__all__ = ["SimpleNet", "SimpleNetModel"]
