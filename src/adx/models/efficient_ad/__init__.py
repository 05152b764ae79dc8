from adx.models.efficient_ad.lightning_model import EfficientAd
from adx.models.efficient_ad.torch_model import EfficientAdModel

__all__ = ["EfficientAd", "EfficientAdModel"]
