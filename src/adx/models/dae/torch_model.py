"""Denoising autoencoder: Bergmann et al.'s convolutional autoencoder trained to restore corrupted images."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from adx.models.components.autoencoder import MapMetric, Metric, ReconstructionModel, Score

Corruption = Literal["gaussian", "cutout", "mask"]


class DAEModel(ReconstructionModel):
    """Learns to map a corrupted normal image back to the clean one; scores clean inputs as the AutoEncoder."""

    name = "DAE"

    def __init__(
        self,
        corruption: Corruption = "gaussian",
        noise_std: float = 0.1,
        cutout_size: float = 0.25,
        mask_patch: int = 8,
        mask_ratio: float = 0.25,
        latent_dim: int = 100,
        bottleneck_kernel: int = 8,
        loss: Metric = "ssim",
        map_metric: MapMetric = "loss",
        score: Score = "max",
        ssim_window: int = 11,
        pretrained: bool = False,
        seed: int = 0,
    ) -> None:
        """DAE.

        Args:
            corruption: what training inputs get: ``gaussian`` (additive noise of std ``noise_std``,
                clipped to [0, 1]), ``cutout`` (one square of side ``cutout_size`` x the shorter image side
                set to 0 at a random place) or ``mask`` (each ``mask_patch`` x ``mask_patch`` cell of a grid
                set to 0 with probability ``mask_ratio``).
            noise_std: standard deviation of the Gaussian noise on [0, 1] images.
            cutout_size: side of the cut-out square as a fraction of the shorter image side, in (0, 1].
            mask_patch: side in pixels of the masking grid's cells.
            mask_ratio: probability that a cell is masked, in (0, 1).
            latent_dim, bottleneck_kernel, loss, map_metric, score, ssim_window, pretrained, seed: as the
                AutoEncoder's (the same network, losses and maps; the SSIM loss by default).
        """
        if corruption not in ("gaussian", "cutout", "mask"):
            raise ValueError(
                f"corruption must be 'gaussian', 'cutout' or 'mask', got {corruption!r}: fix --model.corruption"
            )
        if not noise_std > 0:
            raise ValueError(f"noise_std must be > 0, got {noise_std}: use e.g. --model.noise_std 0.1")
        if not 0 < cutout_size <= 1:
            raise ValueError(
                f"cutout_size must be in (0, 1], got {cutout_size}: use e.g. --model.cutout_size 0.25"
            )
        if mask_patch < 1:
            raise ValueError(f"mask_patch must be >= 1 px, got {mask_patch}: use e.g. --model.mask_patch 8")
        if not 0 < mask_ratio < 1:
            raise ValueError(
                f"mask_ratio must be in (0, 1), got {mask_ratio}: use e.g. --model.mask_ratio 0.25"
            )
        super().__init__(
            latent_dim, bottleneck_kernel, loss, map_metric, score, ssim_window, pretrained, seed
        )
        self.corruption: Corruption = corruption
        self.noise_std, self.cutout_size = float(noise_std), float(cutout_size)
        self.mask_patch, self.mask_ratio = int(mask_patch), float(mask_ratio)

    def corrupt(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A corrupted copy of images [B,3,H,W] in [0,1] (``generator``: None draws from torch's global RNG)."""
        b, _, h, w = images.shape
        dev = images.device
        draw = {"generator": generator, "device": generator.device if generator is not None else dev}
        if self.corruption == "gaussian":
            noise = torch.randn(images.shape, **draw).to(images)
            return (images + self.noise_std * noise).clamp(0.0, 1.0)
        if self.corruption == "cutout":
            side = max(1, round(self.cutout_size * min(h, w)))
            y0 = torch.randint(0, h - side + 1, (b, 1, 1), **draw).to(dev)
            x0 = torch.randint(0, w - side + 1, (b, 1, 1), **draw).to(dev)
            ys = torch.arange(h, device=dev).view(1, h, 1)
            xs = torch.arange(w, device=dev).view(1, 1, w)
            hole = (ys >= y0) & (ys < y0 + side) & (xs >= x0) & (xs < x0 + side)
        else:
            p = self.mask_patch
            cells = torch.rand((b, -(-h // p), -(-w // p)), **draw).to(dev) < self.mask_ratio
            hole = cells.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)[:, :h, :w]
        return images.masked_fill(hole.unsqueeze(1), 0.0)

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Mean per-pixel error between the clean ``batch["image"]`` and the reconstruction of its corruption."""
        images = batch["image"]
        self.check_images(images)
        return self.error(images, self.reconstruct(self.corrupt(images))).mean()
