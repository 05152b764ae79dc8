from adx.models.ganomaly.lightning_model import GANomaly
from adx.models.ganomaly.torch_model import GANomalyModel

__all__ = ["GANomaly", "GANomalyModel"]
