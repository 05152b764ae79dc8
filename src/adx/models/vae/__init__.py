from adx.models.vae.lightning_model import VAE
from adx.models.vae.torch_model import VAEModel, kl_divergence

__all__ = ["VAE", "VAEModel", "kl_divergence"]
