"""FastFlow (Yu et al. 2021, arXiv 2111.07677) as a plain torch module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.models.components.backbone import Backbone
from adx.models.components.flows import conv_subnet, coupling_flow, seeded


class FastFlowModel(nn.Module):
    """Frozen CNN features at several strides, each mapped to N(0, I) by its own 2D normalizing flow."""

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        strides: Sequence[int] = (4, 8, 16),
        weights: str | None = None,
        pretrained: bool = True,
        flow_steps: int = 8,
        hidden_ratio: float = 1.0,
        conv3x3_only: bool = False,
        clamp: float = 2.0,
        seed: int = 0,
    ) -> None:
        """FastFlow.

        Args:
            backbone: timm CNN name (features_only); offline weights resolved as in docs/offline.md.
            strides: feature maps used, by stride (the paper's ResNet layers 1-3 = 4, 8, 16).
            weights: explicit weights file (state dict or .safetensors) for the backbone.
            pretrained: False runs with random weights (tests only).
            flow_steps: coupling blocks per scale (paper: 8 for ResNet18 and WideResNet50).
            hidden_ratio: subnet hidden channels / input channels (paper: 1.0 for ResNet18).
            conv3x3_only: every subnet uses 3x3 convs; False alternates 3x3 and 1x1 blocks.
            clamp: soft clamp of the coupling log-scales (paper: 2.0).
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
        self.backbone = Backbone(backbone, strides, weights, pretrained)
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

    def _subnet(self, step: int):  # noqa: ANN202
        kernel = 1 if step % 2 == 1 and not self.conv3x3_only else 3
        return conv_subnet(kernel, self.hidden_ratio)

    def features(self, images: Tensor) -> list[Tensor]:
        """Images [B,3,H,W] in [0,1] -> per-scale features [B,C,h,w], layer-normalised over (C,h,w)."""
        with torch.no_grad():
            feats = self.backbone(images)
        return [F.layer_norm(f.float().contiguous(), f.shape[1:]) for f in feats]

    def encode(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Images -> per-scale latents z [B,C,h,w] and log|det J| [B]."""
        zs, log_dets = [], []
        for flow, feat in zip(self.flows, self.features(images), strict=True):
            z, log_det = flow(feat)
            zs.append(z)
            log_dets.append(log_det)
        return zs, log_dets

    def loss(self, images: Tensor) -> Tensor:
        """Negative log-likelihood: sum over scales of the batch mean of 0.5 |z|^2 - log|det J|."""
        zs, log_dets = self.encode(images)
        return sum(
            (0.5 * z.pow(2).flatten(1).sum(1) - log_det).mean()
            for z, log_det in zip(zs, log_dets, strict=True)
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] -> image scores [B] (max of the map) and anomaly maps [B,H,W] in [-1, 0]."""
        if int(self.trained_steps) == 0:
            raise RuntimeError("FastFlow has not been trained: fit it (adx fit) or load a checkpoint")
        zs, _ = self.encode(images)
        size = tuple(images.shape[-2:])
        maps = [
            F.interpolate(
                -torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True)),
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            for z in zs
        ]
        anomaly_map = torch.stack(maps).mean(dim=0).squeeze(1)
        return anomaly_map.flatten(1).amax(dim=1), anomaly_map
