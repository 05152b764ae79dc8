"""SimpleNet (Liu et al., CVPR 2023, arXiv 2303.15140) as a plain torch module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.models.components.backbone import Backbone
from adx.models.components.local_features import LocalFeatures
from adx.models.components.maps import to_image_size
from adx.models.components.seeding import batch_seeds, seeded


class SimpleNetModel(nn.Module):
    """Frozen locally aware features, a linear feature adaptor and an MLP discriminator trained to tell the
    adapted normal features from the same features plus Gaussian noise; -D(adapted feature) is the anomaly score."""

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        strides: Sequence[int] = (8, 16),
        weights: str | None = None,
        pretrained: bool = True,
        normalization: str = "backbone",
        patch_size: int = 3,
        embed_dim: int = 1536,
        hidden_dim: int = 1024,
        noise_std: float = 0.015,
        margin: float = 0.5,
        blur_sigma: float = 4.0,
        seed: int = 0,
    ) -> None:
        """SimpleNet.

        Args:
            backbone: timm CNN name (features_only); offline weights resolved as in docs/offline.md. The paper's
                WideResNet-50 is ``wide_resnet50_2`` (its weights do not install from PyPI).
            strides: feature maps used, by stride (the paper's WideResNet-50 layer2 + layer3 = 8 and 16).
            weights: explicit weights file (state dict or .safetensors) for the backbone.
            pretrained: False runs with random weights (tests only).
            normalization: input normalisation: ``backbone`` (the weights' own mean/std), ``imagenet``,
                ``none`` or ``m1,m2,m3/s1,s2,s3`` (see docs/normalization.md).
            patch_size: side of the neighbourhood unfolded around each position (paper: 3).
            embed_dim: each level's unfolded neighbourhoods are pooled to this many values, and the levels'
                concatenation again (the paper's pretrain and target dimensions, both 1536); also the adaptor's
                width.
            hidden_dim: the discriminator's hidden layer (authors' script: 1024).
            noise_std: standard deviation of the Gaussian noise that makes anomalous features (paper: 0.015).
            margin: the truncated L1 loss pushes D(normal) above +margin and D(noisy) below -margin (paper:
                th+ = 0.5, th- = -0.5).
            blur_sigma: Gaussian smoothing of the upsampled map, in pixels (paper: 4).
            seed: seed of the adaptor's and discriminator's initial weights and of the noise.
        """
        super().__init__()
        strides = tuple(int(s) for s in strides)
        if not strides:
            raise ValueError("strides must name at least one feature map, e.g. --model.strides [8,16]")
        if len(set(strides)) != len(strides) or list(strides) != sorted(strides):
            raise ValueError(
                f"strides must be distinct and ascending, got {list(strides)}: use e.g. --model.strides [8,16]"
            )
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(
                f"patch_size must be a positive odd number, got {patch_size}: use --model.patch_size 3"
            )
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}: use e.g. --model.embed_dim 1536")
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}: use e.g. --model.hidden_dim 1024")
        if not noise_std > 0:
            raise ValueError(f"noise_std must be > 0, got {noise_std}: use e.g. --model.noise_std 0.015")
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin}: use e.g. --model.margin 0.5")
        if not blur_sigma >= 0:
            raise ValueError(
                f"blur_sigma must be >= 0 (0: no blur), got {blur_sigma}: use --model.blur_sigma 4"
            )
        # everything random here comes from ``seed`` alone and leaves the global generator as it was
        with seeded(seed):
            self.backbone = Backbone(backbone, strides, weights, pretrained, normalization=normalization)
            self.local = LocalFeatures(self.backbone.channels, patch_size, embed_dim)
            self.adaptor = nn.Linear(embed_dim, embed_dim)
            self.discriminator = nn.Sequential(
                nn.Linear(embed_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.LeakyReLU(0.2),
                nn.Linear(hidden_dim, 1, bias=False),
            )
            for layer in (self.adaptor, self.discriminator[0], self.discriminator[3]):
                nn.init.xavier_normal_(layer.weight)  # the authors' initialisation
        self.noise_std, self.margin, self.blur_sigma, self.seed = noise_std, margin, blur_sigma, seed
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))
        self.loss_terms: dict[str, Tensor] = {}

    def frozen_features(self, images: Tensor) -> list[Tensor]:
        """Images [B,3,H,W] in [0,1] -> the backbone's maps [B,C,h,w] (float32, contiguous: the cache's layout)."""
        with torch.no_grad():
            feats = self.backbone(images)
        return [f.float().contiguous() for f in feats]

    def adapted(self, feats: list[Tensor]) -> Tensor:
        """Backbone maps -> adapted locally aware features [B,h,w,D] at the finest stride."""
        return self.adaptor(self.local(feats))

    def normality(self, adapted: Tensor) -> Tensor:
        """Adapted features [...,D] -> the discriminator's normality score [...] (high: normal)."""
        shape = adapted.shape[:-1]
        return self.discriminator(adapted.reshape(-1, adapted.shape[-1])).reshape(shape)

    def noise(self, batch: dict[str, Any], like: Tensor) -> Tensor:
        """Gaussian noise N(0, noise_std^2) shaped like ``like`` [B,...], one seeded generator per image.

        Training batches that carry ``anomaly_step`` draw fresh noise every step; other batches (the validation
        loss) are seeded by image path, so every epoch scores the same noisy features.
        """
        seeds = batch_seeds(batch, ("simplenet", self.seed), ("simplenet-eval", self.seed))
        rows = []
        for s in seeds:
            g = torch.Generator(device=like.device).manual_seed(s)
            rows.append(torch.randn(like.shape[1:], generator=g, device=like.device))
        return (torch.stack(rows) * self.noise_std).to(like.dtype)

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Truncated L1: mean max(0, margin - D(q)) + mean max(0, margin + D(q + noise)) over all positions.

        Normal and noisy features go through the discriminator as one batch (its BatchNorm sees both). The
        backbone's maps come from ``batch["features"]`` (the frozen-feature cache) when present.
        """
        feats = batch.get("features")
        if feats is None:
            feats = self.frozen_features(batch["image"])
        q = self.adapted(feats)  # [B,h,w,D]
        fake = q + self.noise(batch, q)
        n = q.shape[0] * q.shape[1] * q.shape[2]
        scores = self.normality(torch.cat([q, fake]))
        true_scores, fake_scores = scores[: q.shape[0]].reshape(n), scores[q.shape[0] :].reshape(n)
        loss = F.relu(self.margin - true_scores).mean() + F.relu(self.margin + fake_scores).mean()
        self.loss_terms = {
            "p_true": (true_scores.detach() >= self.margin).float().mean(),
            "p_fake": (fake_scores.detach() < -self.margin).float().mean(),
        }
        return loss

    def check_fitted(self) -> None:
        """Raise RuntimeError unless the adaptor and discriminator were trained."""
        if int(self.trained_steps) == 0:
            raise RuntimeError("SimpleNet has not been trained: fit it (adx fit) or load a checkpoint")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] -> image scores [B] (the largest patch score) and anomaly maps [B,H,W].

        Patch score = -D(adapted feature); the map is the patch scores upsampled (bilinear) to the input and
        Gaussian smoothed.
        """
        patch = -self.normality(self.adapted(self.frozen_features(images)))  # [B,h,w]
        maps = to_image_size(patch, (images.shape[-2], images.shape[-1]), self.blur_sigma)
        return patch.flatten(1).amax(dim=1), maps
