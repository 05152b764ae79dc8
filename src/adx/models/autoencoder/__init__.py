from adx.models.autoencoder.lightning_model import AutoEncoder
from adx.models.autoencoder.torch_model import AutoEncoderModel

__all__ = ["AutoEncoder", "AutoEncoderModel"]
