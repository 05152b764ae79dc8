from adx.models.dae.lightning_model import DAE
from adx.models.dae.torch_model import DAEModel

__all__ = ["DAE", "DAEModel"]
