"""FastFlow (Yu et al. 2021, arXiv 2111.07677) as a plain torch module."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.models.components.backbone import Backbone
from adx.models.components.flows import conv_subnet, coupling_flow, seeded
from adx.models.components.maps import DynamicBuffers


class FastFlowModel(DynamicBuffers):
    """Frozen CNN features at several strides, each mapped to N(0, I) by its own 2D normalizing flow."""

    dynamic_buffers = ("map_mean", "map_std")
    optional_buffers = dynamic_buffers  # absent from checkpoints written before zscore_map existed

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        strides: Sequence[int] = (4, 8, 16),
        weights: str | None = None,
        pretrained: bool = True,
        normalization: str = "backbone",
        flow_steps: int = 8,
        hidden_ratio: float = 1.0,
        conv3x3_only: bool = False,
        clamp: float = 2.0,
        zscore_map: bool = False,
        seed: int = 0,
    ) -> None:
        """FastFlow.

        Args:
            backbone: timm CNN name (features_only); offline weights resolved as in docs/offline.md.
            strides: feature maps used, by stride (the paper's ResNet layers 1-3 = 4, 8, 16).
            weights: explicit weights file (state dict or .safetensors) for the backbone.
            pretrained: False runs with random weights (tests only).
            normalization: input normalisation: ``backbone`` (the weights' own mean/std), ``imagenet``,
                ``none`` or ``m1,m2,m3/s1,s2,s3`` (see docs/normalization.md).
            flow_steps: coupling blocks per scale (paper: 8 for ResNet18 and WideResNet50).
            hidden_ratio: subnet hidden channels / input channels (paper: 1.0 for ResNet18).
            conv3x3_only: every subnet uses 3x3 convs; False alternates 3x3 and 1x1 blocks.
            clamp: soft clamp of the coupling log-scales (paper: 2.0).
            zscore_map: standardise each pixel of the map by its mean and standard deviation over the
                training images' maps (not in the paper; removes the border bias of the paper's map,
                see the README). False: the paper's map.
            seed: seed of the flows' initial weights and channel permutations.
        """
        super().__init__()
        if flow_steps < 1:
            raise ValueError(f"flow_steps must be >= 1, got {flow_steps}: use e.g. --model.flow_steps 8")
        if not hidden_ratio > 0:
            raise ValueError(
                f"hidden_ratio must be > 0, got {hidden_ratio}: use e.g. --model.hidden_ratio 1.0"
            )
        if not clamp > 0:
            raise ValueError(f"clamp must be > 0, got {clamp}: use e.g. --model.clamp 2.0")
        if len(strides) < 1:
            raise ValueError("strides must name at least one feature map, e.g. --model.strides [4,8,16]")
        self.backbone = Backbone(backbone, strides, weights, pretrained, normalization=normalization)
        self.flow_steps, self.hidden_ratio, self.conv3x3_only, self.clamp = (
            flow_steps,
            hidden_ratio,
            conv3x3_only,
            clamp,
        )
        with seeded(seed):
            self.flows = nn.ModuleList(
                coupling_flow((c, 1, 1), [self._subnet(i) for i in range(flow_steps)], clamp)
                for c in self.backbone.channels
            )
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))
        self.zscore_map = zscore_map
        # per-pixel mean / std of the training maps at the training image size (zscore_map)
        self.register_buffer("map_mean", torch.zeros(0, 0))
        self.register_buffer("map_std", torch.zeros(0, 0))

    def _subnet(self, step: int):  # noqa: ANN202
        kernel = 1 if step % 2 == 1 and not self.conv3x3_only else 3
        return conv_subnet(kernel, self.hidden_ratio)

    def frozen_features(self, images: Tensor) -> list[Tensor]:
        """Images [B,3,H,W] in [0,1] -> per-scale features [B,C,h,w], layer-normalised over (C,h,w)."""
        with torch.no_grad():
            feats = self.backbone(images)
        return [F.layer_norm(f.float().contiguous(), f.shape[1:]) for f in feats]

    def encode(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per-scale features -> per-scale latents z [B,C,h,w] and log|det J| [B]."""
        zs, log_dets = [], []
        for flow, feat in zip(self.flows, feats, strict=True):
            z, log_det = flow(feat)
            zs.append(z)
            log_dets.append(log_det)
        return zs, log_dets

    def _features(self, batch: dict[str, Any]) -> list[Tensor]:
        feats = batch.get("features")
        return feats if feats is not None else self.frozen_features(batch["image"])

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Negative log-likelihood: sum over scales of the batch mean of 0.5 |z|^2 - log|det J|."""
        zs, log_dets = self.encode(self._features(batch))
        return sum(
            (0.5 * z.pow(2).flatten(1).sum(1) - log_det).mean()
            for z, log_det in zip(zs, log_dets, strict=True)
        )

    @torch.no_grad()
    def fit_reference(self, batches: Iterable[dict[str, Any]]) -> None:
        """With ``zscore_map``: per-pixel mean and std of the training maps under the current weights."""
        if not self.zscore_map:
            return
        n, total, squares = 0, None, None
        for batch in batches:
            maps = self.paper_map(self.encode(self._features(batch))[0], tuple(batch["image"].shape[-2:]))
            maps = maps.double()
            if total is None:
                total, squares = torch.zeros_like(maps[0]), torch.zeros_like(maps[0])
            elif total.shape != maps.shape[-2:]:
                raise ValueError(
                    f"zscore_map needs one training image size, got {tuple(maps.shape[-2:])} after "
                    f"{tuple(total.shape)}: resize the images to one size (data.image_size)"
                )
            n, total, squares = n + len(maps), total + maps.sum(0), squares + maps.pow(2).sum(0)
        if total is None:
            raise RuntimeError("FastFlow zscore_map: no training images to compute the map reference from")
        mean = total / n
        std = (squares / n - mean.pow(2)).clamp_min(0).sqrt()
        self.map_mean = mean.float()
        self.map_std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12).float()

    def check_fitted(self) -> None:
        """Raise RuntimeError unless the flows were trained (and the zscore_map reference is set)."""
        if int(self.trained_steps) == 0:
            raise RuntimeError("FastFlow has not been trained: fit it (adx fit) or load a checkpoint")
        if self.zscore_map and self.map_mean.numel() == 0:
            raise RuntimeError(
                "FastFlow with zscore_map has no map reference: it is set after each training epoch; re-fit "
                "the model (a checkpoint trained without zscore_map has none)"
            )

    @staticmethod
    def paper_map(zs: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Per scale -exp(-0.5 mean_c z^2), upsampled to ``size`` and averaged over scales [B,H,W]."""
        maps = [
            F.interpolate(
                -torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True)),
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            for z in zs
        ]
        return torch.stack(maps).mean(dim=0).squeeze(1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] -> image scores [B] (max of the map) and anomaly maps [B,H,W].

        The paper's map lies in [-1, 0]; with ``zscore_map`` each pixel is (map - mean) / std against
        the training maps, whose reference is resized when the input size differs from training's.
        """
        zs, _ = self.encode(self.frozen_features(images))
        size = (images.shape[-2], images.shape[-1])
        anomaly_map = self.paper_map(zs, size)
        if self.zscore_map:
            mean, std = self.map_mean, self.map_std
            if tuple(mean.shape) != tuple(size):
                ref = F.interpolate(
                    torch.stack([mean, std])[None], size=size, mode="bilinear", align_corners=False
                )
                mean, std = ref[0, 0], ref[0, 1]
            anomaly_map = (anomaly_map - mean) / std
        return anomaly_map.flatten(1).amax(dim=1), anomaly_map
