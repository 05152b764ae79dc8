"""STFPM (Wang et al., BMVC 2021, arXiv 2103.04257) as a plain torch module."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.models.components.backbone import Backbone
from adx.models.components.maps import upsample_and_combine
from adx.models.components.seeding import seeded

Combine = Literal["product", "sum"]
COMBINES = ("product", "sum")


class STFPMModel(nn.Module):
    """A frozen pretrained teacher and a student of the same architecture trained from random weights to
    reproduce the teacher's L2-normalised feature pyramid on normal images; where they disagree is anomalous."""

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        strides: Sequence[int] = (4, 8, 16),
        weights: str | None = None,
        pretrained: bool = True,
        normalization: str = "backbone",
        combine: Combine = "product",
        seed: int = 0,
    ) -> None:
        """STFPM.

        Args:
            backbone: timm CNN (features_only) for both networks; the paper's ResNet-18 is ``resnet18``.
                Offline weights for the teacher resolve as in docs/offline.md.
            strides: feature maps matched, by stride (the paper's conv2_x..conv4_x of ResNet-18 = 4, 8, 16).
            weights: explicit weights file (state dict or .safetensors) for the teacher.
            pretrained: False gives the teacher random weights too (tests only).
            normalization: input normalisation of both networks: ``backbone`` (the weights' own mean/std),
                ``imagenet``, ``none`` or ``m1,m2,m3/s1,s2,s3`` (docs/normalization.md).
            combine: how the per-scale distance maps, upsampled to the input, make the anomaly map:
                ``product`` (the paper) or ``sum``.
            seed: seed of the student's initial weights.
        """
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(
                f"combine must be 'product' (the paper) or 'sum', got {combine!r}: use --model.combine product"
            )
        strides = tuple(int(s) for s in strides)
        if not strides:
            raise ValueError("strides must name at least one feature map, e.g. --model.strides [4,8,16]")
        if len(set(strides)) != len(strides):
            raise ValueError(
                f"strides must be distinct, got {list(strides)}: use e.g. --model.strides [4,8,16]"
            )
        # both networks are built from ``seed`` alone and leave the global generator as it was
        with seeded(seed):
            self.teacher = Backbone(backbone, strides, weights, pretrained, normalization=normalization)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="backbone .* uses RANDOM weights")
                self.student = Backbone(
                    backbone, strides, pretrained=False, trainable=True, normalization=normalization
                )
        self.combine = combine
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> Backbone:
        """The frozen network (the teacher): what the feature cache, tiling checks and run records read."""
        return self.teacher

    def frozen_features(self, images: Tensor) -> list[Tensor]:
        """Images [B,3,H,W] in [0,1] -> the teacher's maps [B,C,h,w], L2-normalised over channels (float32).

        Contiguous (not channels-last), the layout the frozen-feature cache returns them in, so cached and
        computed features take the same arithmetic and training reads the same losses either way.
        """
        with torch.no_grad():
            feats = self.teacher(images)
        return [F.normalize(f.float(), dim=1).contiguous() for f in feats]

    def student_features(self, images: Tensor) -> list[Tensor]:
        """Images [B,3,H,W] in [0,1] -> the student's maps [B,C,h,w], L2-normalised over channels (float32)."""
        return [F.normalize(f.float(), dim=1) for f in self.student(images)]

    @staticmethod
    def distances(teacher: list[Tensor], student: list[Tensor]) -> list[Tensor]:
        """Per scale, half the squared distance of the normalised feature vectors at each position [B,h,w]."""
        return [0.5 * (t - s).pow(2).sum(dim=1) for t, s in zip(teacher, student, strict=True)]

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Sum over scales of the mean over images and positions of the distance (the paper's loss, alpha_l = 1).

        The teacher's features come from ``batch["features"]`` (the frozen-feature cache) when present.
        """
        images = batch["image"]
        teacher = batch.get("features")
        if teacher is None:
            teacher = self.frozen_features(images)
        return sum(d.mean() for d in self.distances(teacher, self.student_features(images)))

    def check_fitted(self) -> None:
        """Raise RuntimeError unless the student was trained."""
        if int(self.trained_steps) == 0:
            raise RuntimeError("STFPM's student has not been trained: fit it (adx fit) or load a checkpoint")

    def anomaly_map(self, distances: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Per-scale distance maps [B,h,w] -> upsampled (bilinear) to ``size`` and combined [B,H,W]."""
        return upsample_and_combine(distances, size, multiply=self.combine == "product")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] -> image scores [B] (the map's maximum) and anomaly maps [B,H,W]."""
        distances = self.distances(self.frozen_features(images), self.student_features(images))
        anomaly_map = self.anomaly_map(distances, (images.shape[-2], images.shape[-1]))
        return anomaly_map.flatten(1).amax(dim=1), anomaly_map
