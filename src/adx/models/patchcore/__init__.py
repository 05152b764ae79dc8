from adx.models.patchcore.lightning_model import PatchCore
from adx.models.patchcore.torch_model import PatchCoreModel

__all__ = ["PatchCore", "PatchCoreModel"]
