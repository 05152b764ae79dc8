"""Convolutional autoencoder of Bergmann et al. (VISAPP 2019) and what reconstruction methods share.

The encoder halves the resolution four times (total stride 16) with 4 x 4 stride-2 convolutions between
3 x 3 ones, then maps the stride-16 map to the latent with one ``bottleneck_kernel`` x ``bottleneck_kernel``
convolution without padding; the decoder mirrors it with transposed convolutions. At the paper's 128 px
and kernel 8 the latent is one vector of ``latent_dim``; larger inputs (any multiple of 16) give a
(H/16 - k + 1) x (W/16 - k + 1) grid of latent vectors.

:class:`ReconstructionModel` is the plain torch base of the AutoEncoder, DAE and VAE: reconstruct, compare
(squared error or 1 - SSIM per pixel), score; subclasses define ``loss(batch)``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from adx.models.components.input_size import input_sizes
from adx.models.components.ssim import ssim_map

STRIDE = 16
"""Total stride of the encoder before the bottleneck convolution."""

Metric = Literal["l2", "ssim"]
MapMetric = Literal["loss", "l2", "ssim"]
Score = Literal["max", "mean"]


class InputSizeError(ValueError):
    """An input (or configured image / tile) size the convolutional autoencoder cannot take."""


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


def conv_encoder(in_channels: int, out_channels: int, bottleneck_kernel: int) -> nn.Sequential:
    """Bergmann et al.'s encoder: [B,in,H,W] -> [B,out,H/16-k+1,W/16-k+1]; the last layer is linear."""
    layers: list[nn.Module] = []
    # (in, out, kernel, stride, padding) as in the paper's Table 1
    spec = [
        (in_channels, 32, 4, 2, 1),
        (32, 32, 4, 2, 1),
        (32, 32, 3, 1, 1),
        (32, 64, 4, 2, 1),
        (64, 64, 3, 1, 1),
        (64, 128, 4, 2, 1),
        (128, 64, 3, 1, 1),
        (64, 32, 3, 1, 1),
    ]
    for cin, cout, k, s, p in spec:
        layers += [nn.Conv2d(cin, cout, k, s, p), _act()]
    layers.append(nn.Conv2d(32, out_channels, bottleneck_kernel, 1, 0))
    return nn.Sequential(*layers)


def conv_decoder(latent_channels: int, out_channels: int, bottleneck_kernel: int) -> nn.Sequential:
    """The encoder mirrored (transposed convs where it strides): latent -> [B,out,H,W] in (0, 1) (sigmoid)."""
    return nn.Sequential(
        nn.ConvTranspose2d(latent_channels, 32, bottleneck_kernel, 1, 0),
        _act(),
        nn.Conv2d(32, 64, 3, 1, 1),
        _act(),
        nn.Conv2d(64, 128, 3, 1, 1),
        _act(),
        nn.ConvTranspose2d(128, 64, 4, 2, 1),
        _act(),
        nn.Conv2d(64, 64, 3, 1, 1),
        _act(),
        nn.ConvTranspose2d(64, 32, 4, 2, 1),
        _act(),
        nn.Conv2d(32, 32, 3, 1, 1),
        _act(),
        nn.ConvTranspose2d(32, 32, 4, 2, 1),
        _act(),
        nn.ConvTranspose2d(32, out_channels, 4, 2, 1),
        nn.Sigmoid(),
    )


def he_init(module: nn.Module) -> None:
    """He-normal weights for LeakyReLU(0.2) and zero biases in every (transposed) convolution of ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(layer.weight, a=0.2, nonlinearity="leaky_relu")
            nn.init.zeros_(layer.bias)


def smallest_size(bottleneck_kernel: int) -> int:
    """Smallest side the encoder takes: 16 x the bottleneck kernel (the latent is then 1 x 1)."""
    return STRIDE * bottleneck_kernel


def check_input_size(size: tuple[int, int], bottleneck_kernel: int, what: str, flag: str) -> None:
    """Raise InputSizeError unless both sides are multiples of 16 and at least 16 x ``bottleneck_kernel``."""
    h, w = (int(v) for v in size)
    low = smallest_size(bottleneck_kernel)
    if h % STRIDE == 0 and w % STRIDE == 0 and min(h, w) >= low:
        return
    bad = h if (h % STRIDE or h < low) else w
    nearest = max(low, round(bad / STRIDE) * STRIDE)
    raise InputSizeError(
        f"{what} is {h}x{w} px, but the convolutional autoencoder needs sides that are multiples of {STRIDE} "
        f"(its encoder's total stride) and at least {low} px ({STRIDE} x bottleneck_kernel "
        f"{bottleneck_kernel}): use {flag} {nearest}"
        + (
            f", or a smaller --model.bottleneck_kernel (at most {max(1, min(h, w) // STRIDE)})"
            if min(h, w) < low and min(h, w) >= STRIDE
            else ""
        )
    )


def check_datamodule_size(model: ReconstructionModel, datamodule: Any) -> None:
    """Before fitting: the data module's image size (its tile size when tiling) suits ``model``."""
    for size, flag in input_sizes(datamodule):
        check_input_size(size, model.bottleneck_kernel, flag, flag)


def error_map(images: Tensor, recon: Tensor, metric: Metric, ssim_window: int = 11) -> Tensor:
    """Per-pixel reconstruction error [B,H,W]: squared error summed over channels, or 1 - SSIM (channel mean)."""
    if metric == "l2":
        return (images - recon).pow(2).sum(dim=1)
    return 1.0 - ssim_map(images, recon, window=ssim_window).mean(dim=1)


class ReconstructionModel(nn.Module):
    """Encoder-decoder that scores images by how badly it reconstructs them (base of AE, DAE, VAE)."""

    name = "ReconstructionModel"
    # encoder output channels per latent dimension (the VAE: 2, its mean and log-variance)
    latent_factor = 1

    def __init__(
        self,
        latent_dim: int = 100,
        bottleneck_kernel: int = 8,
        loss: Metric = "l2",
        map_metric: MapMetric = "loss",
        score: Score = "max",
        ssim_window: int = 11,
        pretrained: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}: use e.g. --model.latent_dim 100")
        if bottleneck_kernel < 1:
            raise ValueError(
                f"bottleneck_kernel must be >= 1, got {bottleneck_kernel}: use e.g. --model.bottleneck_kernel 8"
            )
        if loss not in ("l2", "ssim"):
            raise ValueError(f"loss must be 'l2' or 'ssim', got {loss!r}: fix --model.loss")
        if map_metric not in ("loss", "l2", "ssim"):
            raise ValueError(
                f"map_metric must be 'loss', 'l2' or 'ssim', got {map_metric!r}: fix --model.map_metric"
            )
        if score not in ("max", "mean"):
            raise ValueError(f"score must be 'max' or 'mean', got {score!r}: fix --model.score")
        if ssim_window < 3 or ssim_window % 2 == 0:
            raise ValueError(
                f"ssim_window must be odd and >= 3, got {ssim_window}: use e.g. --model.ssim_window 11"
            )
        if pretrained:
            raise ValueError(
                f"{self.name} learns from scratch and has no pretrained weights: drop --model.pretrained "
                "(or set it to false)"
            )
        self.latent_dim, self.bottleneck_kernel = latent_dim, bottleneck_kernel
        self.loss_metric: Metric = loss
        self.map_metric: Metric = loss if map_metric == "loss" else map_metric
        self.score, self.ssim_window = score, ssim_window
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = conv_encoder(3, latent_dim * self.latent_factor, bottleneck_kernel)
            self.decoder = conv_decoder(latent_dim, 3, bottleneck_kernel)
            he_init(self)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    @property
    def stride(self) -> int:
        """Total stride of the encoder: input sides must be multiples of it."""
        return STRIDE

    def check_images(self, images: Tensor) -> None:
        """Raise InputSizeError (before any work) unless images [B,3,H,W] have a size the encoder takes."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputSizeError(f"{self.name} expects images [B,3,H,W], got {tuple(images.shape)}")
        check_input_size(tuple(images.shape[-2:]), self.bottleneck_kernel, "the input", "--data.image_size")

    def decode(self, z: Tensor) -> Tensor:
        """Latent [B,latent_dim,h,w] -> reconstruction [B,3,H,W] in (0, 1)."""
        return self.decoder(z)

    def reconstruct(self, images: Tensor) -> Tensor:
        """Images [B,3,H,W] in [0,1] -> deterministic reconstruction [B,3,H,W] (the VAE: of the posterior mean)."""
        return self.decode(self.encoder(images)[:, : self.latent_dim])

    def error(self, images: Tensor, recon: Tensor, metric: Metric | None = None) -> Tensor:
        """Per-pixel error [B,H,W] of ``recon`` against ``images`` (``metric`` defaults to the loss's)."""
        return error_map(images, recon, metric or self.loss_metric, self.ssim_window)

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Scalar training loss on ``batch["image"]`` [B,3,H,W] (defined by each method)."""
        raise NotImplementedError

    def check_datamodule(self, datamodule: Any) -> None:
        """Before fitting (adx calls it at fit start): the data's image size, or tile size, suits the encoder."""
        check_datamodule_size(self, datamodule)

    def check_fitted(self) -> None:
        """Raise RuntimeError unless the network was trained."""
        if int(self.trained_steps) == 0:
            raise RuntimeError(f"{self.name} has not been trained: fit it (adx fit) or load a checkpoint")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] in [0,1] -> image scores [B] (max or mean of the map) and error maps [B,H,W]."""
        self.check_images(images)
        anomaly_map = self.error(images, self.reconstruct(images), self.map_metric)
        flat = anomaly_map.flatten(1)
        scores = flat.amax(dim=1) if self.score == "max" else flat.mean(dim=1)
        return scores, anomaly_map
