from adx.models.cflow.lightning_model import CFlow
from adx.models.cflow.torch_model import CFlowModel

__all__ = ["CFlow", "CFlowModel"]
