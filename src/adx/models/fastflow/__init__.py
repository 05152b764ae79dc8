from adx.models.fastflow.lightning_model import FastFlow
from adx.models.fastflow.torch_model import FastFlowModel

__all__ = ["FastFlow", "FastFlowModel"]
