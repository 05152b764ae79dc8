"""Convolutional autoencoder (Bergmann et al., VISAPP 2019, arXiv 1807.02011) as a plain torch module."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from adx.models.components.autoencoder import MapMetric, Metric, ReconstructionModel, Score


class AutoEncoderModel(ReconstructionModel):
    """Trained to reproduce normal images; the per-pixel reconstruction error is the anomaly map."""

    name = "AutoEncoder"

    def __init__(
        self,
        latent_dim: int = 100,
        bottleneck_kernel: int = 8,
        loss: Metric = "ssim",
        map_metric: MapMetric = "loss",
        score: Score = "max",
        ssim_window: int = 11,
        pretrained: bool = False,
        seed: int = 0,
    ) -> None:
        """AutoEncoder.

        Args:
            latent_dim: latent channels (the paper: 100).
            bottleneck_kernel: kernel of the last encoder / first decoder convolution (the paper: 8, so a
                128 px input has a 1 x 1 latent); inputs need sides that are multiples of 16 and at least
                16 x this.
            loss: ``ssim`` (1 - SSIM per pixel: the paper's SSIM autoencoder) or ``l2`` (squared error
                summed over channels, per pixel: the paper's L2 baseline).
            map_metric: the anomaly map's per-pixel error: ``loss`` (the training loss's), ``l2`` or ``ssim``.
            score: image score from the map, ``max`` (as the MVTec AD paper classifies) or ``mean``.
            ssim_window: SSIM window side in pixels (the paper: 11; Gaussian, sigma 1.5).
            pretrained: must stay False: there are no pretrained weights (kept so the common
                ``--model.pretrained false`` of the tests and tools applies).
            seed: seed of the initial weights.
        """
        super().__init__(
            latent_dim, bottleneck_kernel, loss, map_metric, score, ssim_window, pretrained, seed
        )

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Mean per-pixel reconstruction error (``loss`` metric) over ``batch["image"]`` [B,3,H,W]."""
        images = batch["image"]
        self.check_images(images)
        return self.error(images, self.reconstruct(images)).mean()
