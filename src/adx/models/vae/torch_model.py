"""Variational autoencoder (Kingma & Welling 2014) on Bergmann et al.'s convolutional autoencoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adx.models.components.autoencoder import MapMetric, Metric, ReconstructionModel, Score


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample [B], summed over the latent's channels and positions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


class VAEModel(ReconstructionModel):
    """Gaussian latent, reparameterised; scores by the reconstruction of the posterior mean (no sampling)."""

    name = "VAE"
    latent_factor = 2  # the encoder gives the posterior's mean and log-variance

    def __init__(
        self,
        beta: float = 1.0,
        latent_dim: int = 100,
        bottleneck_kernel: int = 8,
        loss: Metric = "l2",
        map_metric: MapMetric = "loss",
        score: Score = "max",
        ssim_window: int = 11,
        pretrained: bool = False,
        seed: int = 0,
    ) -> None:
        """VAE.

        Args:
            beta: weight of the KL term; 1.0 is the evidence lower bound (with the L2 loss: of a Gaussian
                decoder of variance 1/2 per pixel and channel).
            latent_dim, bottleneck_kernel, loss, map_metric, score, ssim_window, pretrained, seed: as the
                AutoEncoder's. The reconstruction term is the per-pixel error summed over the image, so
                that it and the KL term, summed over the latent, keep their ELBO proportions.
        """
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}: use e.g. --model.beta 1.0")
        super().__init__(
            latent_dim, bottleneck_kernel, loss, map_metric, score, ssim_window, pretrained, seed
        )
        self.beta = float(beta)

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] -> posterior mean and log-variance, each [B,latent_dim,h,w]."""
        mu, logvar = self.encoder(images).chunk(2, dim=1)
        return mu, logvar

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Batch mean of the summed per-pixel error of a sampled reconstruction + beta x KL."""
        images = batch["image"]
        self.check_images(images)
        mu, logvar = self.posterior(images)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon = self.decode(z)
        rec = self.error(images, recon).flatten(1).sum(dim=1)
        return (rec + self.beta * kl_divergence(mu, logvar)).mean()
