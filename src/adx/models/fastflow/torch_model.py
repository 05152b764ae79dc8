"""FastFlow (Yu et al. 2021, arXiv 2111.07677) as a plain torch module."""

from __future__ import annotations

from collections.abc import Sequence

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
        self.zscore_map = zscore_map
        # per-pixel mean / std of the training maps at the training image size (zscore_map)
        self.register_buffer("map_mean", torch.zeros(0, 0))
        self.register_buffer("map_std", torch.zeros(0, 0))
        self._map_sums: list[Tensor] | None = None

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
        """Negative log-likelihood: sum over scales of the batch mean of 0.5 |z|^2 - log|det J|.

        In training mode with ``zscore_map``, also adds the batch's maps to the running per-pixel sums
        that :meth:`end_map_reference` turns into the reference.
        """
        zs, log_dets = self.encode(images)
        if self.zscore_map and self.training and self._map_sums is not None:
            self._collect(self.paper_map(zs, tuple(images.shape[-2:])).detach().double())
        return sum(
            (0.5 * z.pow(2).flatten(1).sum(1) - log_det).mean()
            for z, log_det in zip(zs, log_dets, strict=True)
        )

    def _collect(self, maps: Tensor) -> None:
        if not self._map_sums:
            self._map_sums = [torch.zeros(()), torch.zeros_like(maps[0]), torch.zeros_like(maps[0])]
        count, total, squares = self._map_sums
        if total.shape != maps.shape[-2:]:
            raise ValueError(
                f"zscore_map needs one training image size, got {tuple(maps.shape[-2:])} after "
                f"{tuple(total.shape)}: resize the images to one size (data.image_size)"
            )
        self._map_sums = [count + len(maps), total + maps.sum(0), squares + maps.pow(2).sum(0)]

    def begin_map_reference(self) -> None:
        """Start collecting training maps (the Lightning adapter calls it at each epoch start)."""
        self._map_sums = []

    def end_map_reference(self) -> None:
        """Set ``map_mean`` / ``map_std`` from the maps collected since :meth:`begin_map_reference`."""
        if not self._map_sums:
            return
        n, total, squares = self._map_sums
        mean = total / n
        std = (squares / n - mean.pow(2)).clamp_min(0).sqrt()
        self.map_mean = mean.float()
        self.map_std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12).float()
        self._map_sums = None

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
        if int(self.trained_steps) == 0:
            raise RuntimeError("FastFlow has not been trained: fit it (adx fit) or load a checkpoint")
        zs, _ = self.encode(images)
        size = tuple(images.shape[-2:])
        anomaly_map = self.paper_map(zs, size)
        if self.zscore_map:
            if self.map_mean.numel() == 0:
                raise RuntimeError(
                    "FastFlow with zscore_map has no map reference: it is set during training; re-fit the "
                    "model (a checkpoint trained without zscore_map has none)"
                )
            mean, std = self.map_mean, self.map_std
            if tuple(mean.shape) != size:
                ref = F.interpolate(
                    torch.stack([mean, std])[None], size=size, mode="bilinear", align_corners=False
                )
                mean, std = ref[0, 0], ref[0, 1]
            anomaly_map = (anomaly_map - mean) / std
        return anomaly_map.flatten(1).amax(dim=1), anomaly_map
