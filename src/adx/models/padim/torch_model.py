"""PaDiM (Defard et al., ICPR 2020, arXiv 2011.08785) as a plain torch module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adx.distributed import all_reduce_sum
from adx.models.components.backbone import Backbone
from adx.models.components.maps import DynamicBuffers, align_and_concat, to_image_size


class PadimModel(DynamicBuffers):
    """A Gaussian per patch position over a random channel subset; Mahalanobis distance maps."""

    dynamic_buffers = ("mean", "inv_cov")

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        strides: Sequence[int] = (4, 8, 16),
        weights: str | None = None,
        pretrained: bool = True,
        normalization: str = "backbone",
        n_features: int | None = 100,
        epsilon: float = 0.01,
        blur_sigma: float = 4.0,
        seed: int = 0,
    ) -> None:
        """PaDiM.

        Args:
            backbone: timm CNN name (features_only); offline weights resolved as in docs/offline.md.
            strides: feature maps used, by stride; they are upsampled to the finest and concatenated.
            weights: explicit weights file (state dict or .safetensors) for the backbone.
            pretrained: False runs with random weights (tests only).
            normalization: input normalisation: ``backbone`` (the weights' own mean/std), ``imagenet``,
                ``none`` or ``m1,m2,m3/s1,s2,s3`` (see docs/normalization.md).
            n_features: size of the random channel subset (None keeps all channels).
            epsilon: ridge added to each covariance diagonal.
            blur_sigma: Gaussian smoothing of the upsampled map, in pixels.
            seed: seed of the channel subset.
        """
        super().__init__()
        self.backbone = Backbone(backbone, strides, weights, pretrained, normalization=normalization)
        total = sum(self.backbone.channels)
        if n_features is not None and not 0 < n_features <= total:
            where = f"{backbone} at strides {tuple(strides)}"
            raise ValueError(
                f"n_features {n_features} exceeds the {total} channels of {where}: use --model.n_features "
                f"{total} or less (or null for all of them), or a backbone/strides with more channels"
                if n_features > total
                else f"n_features must be at least 1, got {n_features}: use --model.n_features 1 to {total} "
                f"({where}), or null for all channels"
            )
        d = n_features or total
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("channels", torch.randperm(total, generator=gen)[:d].sort().values)
        self.register_buffer("mean", torch.empty(0, d))
        self.register_buffer("inv_cov", torch.empty(0, d, d))
        self.epsilon, self.blur_sigma = epsilon, blur_sigma
        self._n, self._sum, self._outer = 0, None, None
        self._grid: tuple[int, int] | None = None

    def embed(self, images: Tensor) -> Tensor:
        """Images [B,3,H,W] -> embeddings [B,d,h,w] at the finest stride."""
        return align_and_concat(self.backbone(images))[:, self.channels]

    def update(self, images: Tensor) -> None:
        """Accumulate per-position first and second moments of a batch of normal images."""
        emb = self.embed(images).double()
        b, d, h, w = emb.shape
        x = emb.permute(2, 3, 0, 1).reshape(h * w, b, d)  # [P,B,d]
        if self._sum is None:
            self._sum, self._outer, self._grid = x.new_zeros(h * w, d), x.new_zeros(h * w, d, d), (h, w)
        self._sum += x.sum(1)
        self._outer += torch.bmm(x.transpose(1, 2), x)
        self._n += b

    def fit(self) -> None:
        """Per-position mean and regularised inverse covariance from the moments of every rank's images."""
        if self._sum is None:
            raise RuntimeError("PaDiM.fit() called before any update(): no training images were seen")
        # one collective per tensor and rank, whatever the number of batches each rank saw
        self._sum, self._outer = all_reduce_sum(self._sum), all_reduce_sum(self._outer)
        n = int(all_reduce_sum(torch.tensor([self._n], dtype=torch.float64, device=self._sum.device)))
        if n < 2:
            raise RuntimeError(f"PaDiM needs at least 2 training images, got {n}")
        mean = self._sum / n
        cov = (self._outer - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
        cov += self.epsilon * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        self.mean = mean.float()
        self.inv_cov = torch.linalg.inv(cov).float()
        self._n, self._sum, self._outer = 0, None, None

    def check_fitted(self) -> None:
        """Raise RuntimeError when no Gaussians were fitted."""
        if len(self.mean) == 0:
            raise RuntimeError("PaDiM is not fitted: run adx fit or load a checkpoint")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] -> image scores [B] (map maxima) and anomaly maps [B,H,W]."""
        emb = self.embed(images)
        b, d, h, w = emb.shape
        if h * w != len(self.mean):
            raise ValueError(
                f"PaDiM was fitted on a {len(self.mean)}-position grid but got {h}x{w}: "
                "test with the image_size used for fitting"
            )
        delta = emb.permute(2, 3, 0, 1).reshape(h * w, b, d) - self.mean[:, None]
        dist = (torch.bmm(delta, self.inv_cov) * delta).sum(-1).clamp_min(0).sqrt()  # [P,B]
        maps = to_image_size(dist.T.reshape(b, h, w), (images.shape[-2], images.shape[-1]), self.blur_sigma)
        return maps.flatten(1).max(1).values, maps
