"""Reverse Distillation (Deng and Li, CVPR 2022, arXiv 2201.10703) as a plain torch module.

A frozen teacher encoder gives feature maps at a few strides; a trainable one-class bottleneck embedding
(OCBE) fuses them into one compact map at twice the deepest stride, and a student decoder restores the
teacher's maps from it, deepest first. Where the student fails to restore the teacher (1 - cosine
similarity per position) the image is anomalous. The bottleneck and decoder are built from the teacher's
channel counts and strides, so any timm CNN can be the teacher (the README explains the layout).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.models.components.backbone import Backbone
from adx.models.components.maps import gaussian_smooth, upsample_and_combine
from adx.models.components.seeding import seeded

LossMode = Literal["sample", "position"]
MapMode = Literal["add", "multiply"]
LOSS_MODES = ("sample", "position")
MAP_MODES = ("add", "multiply")


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class Bottleneck(nn.Module):
    """ResNet bottleneck block [B,in,h,w] -> [B,out,h*f,w*f] (``up``) or [B,out,h/f,w/f], f = ``factor``.

    1x1 reduce to ``width`` channels (default ``out // 2``, the wide ResNet's), then a 3x3 conv with stride ``factor``
    (down) or a ``factor`` x ``factor`` transposed conv with stride ``factor`` (up), then 1x1 expand; the
    shortcut is projected (1x1 strided conv or transposed conv, with BatchNorm) when the shape changes.
    The sum goes through a ReLU unless ``activate`` is False (a linear output).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        factor: int = 1,
        up: bool = False,
        activate: bool = True,
        width: int | None = None,
    ) -> None:
        super().__init__()
        self.activate = activate
        width = width or max(1, out_channels // 2)
        if factor > 1 and up:
            middle: nn.Module = nn.ConvTranspose2d(width, width, factor, stride=factor, bias=False)
        else:
            middle = nn.Conv2d(width, width, 3, stride=factor, padding=1, bias=False)
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            *_bn_relu(width),
            middle,
            *_bn_relu(width),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if factor > 1 or in_channels != out_channels:
            if factor > 1 and up:
                project: nn.Module = nn.ConvTranspose2d(
                    in_channels, out_channels, factor, stride=factor, bias=False
                )
            else:
                project = nn.Conv2d(in_channels, out_channels, 1, stride=factor, bias=False)
            self.shortcut = nn.Sequential(project, nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """[B,in,h,w] -> [B,out,h',w']."""
        out = self.branch(x) + self.shortcut(x)
        return F.relu(out) if self.activate else out


def _crop(x: Tensor, like: Tensor) -> Tensor:
    """``x`` cut to the spatial size of ``like`` (strided convs round up; a no-op for multiples of 32 px)."""
    return x[..., : like.shape[-2], : like.shape[-1]]


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion (MFF) to the deepest map, then the one-class embedding (OCE) stage.

    MFF: each shallower map goes down to the deepest stride by 3x3 stride-2 convs (BatchNorm, ReLU), each
    step taking the channel count of the teacher's next deeper map; the results are concatenated with the
    deepest map. OCE: ``blocks`` bottleneck blocks, the first with stride 2, to ``embedding_channels``,
    each ``width`` channels wide inside (None: half of ``embedding_channels``).
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        embedding_channels: int,
        blocks: int,
        width: int | None = None,
    ) -> None:
        super().__init__()
        self.fuse = nn.ModuleList()
        last = strides[-1]
        for c, s in zip(channels[:-1], strides[:-1], strict=True):
            steps: list[nn.Module] = []
            while s < last:
                nxt = next(c2 for c2, s2 in zip(channels, strides, strict=True) if s2 >= 2 * s)
                steps += [nn.Conv2d(c, nxt, 3, stride=2, padding=1, bias=False), *_bn_relu(nxt)]
                c, s = nxt, 2 * s
            self.fuse.append(nn.Sequential(*steps))
        fused = channels[-1] * len(channels)
        self.embed = nn.Sequential(
            Bottleneck(fused, embedding_channels, factor=2, width=width),
            *(Bottleneck(embedding_channels, embedding_channels, width=width) for _ in range(blocks - 1)),
        )

    def forward(self, feats: list[Tensor]) -> Tensor:
        """Teacher maps [B,C_i,H/s_i,W/s_i] -> embedding [B,E,H/2s,W/2s] (s: the deepest stride)."""
        deepest = feats[-1]
        fused = [_crop(f(x), deepest) for f, x in zip(self.fuse, feats[:-1], strict=True)]
        return self.embed(torch.cat([*fused, deepest], dim=1))


class StudentDecoder(nn.Module):
    """The teacher in reverse: one upsampling stage per teacher map, deepest first, with its channels.

    Stage i upsamples by (previous stride / s_i) with a transposed-conv bottleneck block, then runs
    ``blocks[i] - 1`` more blocks at that resolution; its output is compared with the teacher's map i.
    With ``linear_output`` the last block of each stage has no final ReLU, so the student can restore
    signed teacher maps (EfficientNet / MobileNet stages end in a linear projection).
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        embedding_channels: int,
        blocks: Sequence[int],
        linear_output: bool = True,
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        c_prev, s_prev = embedding_channels, 2 * strides[-1]
        for c, s, n in reversed(list(zip(channels, strides, blocks, strict=True))):
            layers = [Bottleneck(c_prev, c, factor=s_prev // s, up=True)]
            layers += [Bottleneck(c, c) for _ in range(n - 1)]
            layers[-1].activate = not linear_output
            stages.append(nn.Sequential(*layers))
            c_prev, s_prev = c, s
        self.stages = nn.ModuleList(reversed(stages))  # stage i restores teacher map i

    def forward(self, embedding: Tensor, like: list[Tensor]) -> list[Tensor]:
        """Embedding -> student maps shaped as the teacher maps ``like`` (shallowest first)."""
        out: list[Tensor] = []
        x = embedding
        for i in range(len(self.stages) - 1, -1, -1):
            x = _crop(self.stages[i](x), like[i])
            out.append(x)
        return out[::-1]


def _check_positive(name: str, value: Any, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}: use e.g. --model.{name} {example}")


class ReverseDistillationModel(nn.Module):
    """Frozen teacher encoder -> trainable OCBE -> trainable student decoder; 1 - cosine is the anomaly."""

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        strides: Sequence[int] = (4, 8, 16),
        weights: str | None = None,
        pretrained: bool = True,
        normalization: str = "backbone",
        embedding_channels: int | None = None,
        embedding_width: int | None = None,
        oce_blocks: int = 3,
        decoder_blocks: Sequence[int] = (6, 4, 3),
        linear_output: bool = True,
        loss_mode: LossMode = "sample",
        map_mode: MapMode = "add",
        sigma: float = 4.0,
        seed: int = 0,
    ) -> None:
        """Reverse Distillation.

        Args:
            backbone: the teacher, a timm CNN (features_only), frozen; offline weights as in docs/offline.md
                (paper: WideResNet-50, which does not install offline).
            strides: the teacher maps distilled, by stride (paper: WideResNet-50 layers 1-3 = 4, 8, 16).
            weights: explicit weights file (state dict or .safetensors) for the teacher.
            pretrained: False runs with a random teacher (tests only).
            normalization: input normalisation: ``backbone`` (the weights' own mean/std), ``imagenet``,
                ``none`` or ``m1,m2,m3/s1,s2,s3`` (see docs/normalization.md).
            embedding_channels: channels of the one-class embedding at twice the deepest stride; None: twice
                the deepest teacher map's (paper: 2048 for WideResNet-50's 1024).
            embedding_width: channels inside each bottleneck block of the one-class embedding (after its 1x1
                reduction); None: half of ``embedding_channels`` (the authors' WideResNet-50 code: 1024).
                anomalib 2.7 builds a quarter (512 for WideResNet-50), which trains faster.
            oce_blocks: bottleneck blocks of the one-class embedding stage (paper: 3).
            decoder_blocks: bottleneck blocks of the decoder stage that restores each teacher map, in the order
                of ``strides`` (the authors' WideResNet-50 decoder: 6, 4, 3 blocks at strides 4, 8, 16).
            linear_output: the last block of each decoder stage has no final ReLU, so the student can restore
                signed teacher maps (EfficientNet's stages end linearly; the default lite0 teacher's maps are
                about half negative). False: the paper's ReLU, right for a ResNet teacher (post-ReLU maps).
            loss_mode: ``sample``: per map, 1 - cosine similarity of each image's whole flattened maps (the
                authors' code, which produced the paper's numbers); ``position``: 1 - cosine along the
                channels, averaged over positions (the paper's Eq. 2). Either is averaged over the batch
                and summed over the maps.
            map_mode: per-map 1 - cosine maps, upsampled to the input size, are summed (``add``: the paper's
                accumulation) or multiplied (``multiply``).
            sigma: Gaussian blur of the anomaly map in pixels (paper: 4); 0 disables it.
            seed: seed of the bottleneck's and decoder's initial weights.
        """
        super().__init__()
        if embedding_channels is not None:
            _check_positive("embedding_channels", embedding_channels, "2048")
        if embedding_width is not None:
            _check_positive("embedding_width", embedding_width, "1024")
        _check_positive("oce_blocks", oce_blocks, "3")
        if isinstance(decoder_blocks, int | str) or not decoder_blocks:
            raise ValueError(
                f"decoder_blocks must be a list of block counts, one per stride, got {decoder_blocks!r}: "
                "use e.g. --model.decoder_blocks [6,4,3]"
            )
        for n in decoder_blocks:
            _check_positive("decoder_blocks", n, "[6,4,3]")
        if loss_mode not in LOSS_MODES:
            raise ValueError(
                f"loss_mode must be 'sample' or 'position', got {loss_mode!r}: fix --model.loss_mode"
            )
        if map_mode not in MAP_MODES:
            raise ValueError(f"map_mode must be 'add' or 'multiply', got {map_mode!r}: fix --model.map_mode")
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be >= 0 (0: no blur), got {sigma!r}: use e.g. --model.sigma 4")
        strides = tuple(int(s) for s in strides)
        if not strides or list(strides) != sorted(set(strides)):
            raise ValueError(
                f"strides must be distinct and increasing, got {list(strides)}: use e.g. --model.strides [4,8,16]"
            )
        ratios = [b // a for a, b in zip(strides, strides[1:], strict=False)]
        if any(b % a or r & (r - 1) for a, b, r in zip(strides, strides[1:], ratios, strict=False)):
            raise ValueError(
                f"strides must each be a power-of-two multiple of the previous one, got {list(strides)}: "
                "use e.g. --model.strides [4,8,16]"
            )
        self.backbone = Backbone(backbone, strides, weights, pretrained, normalization=normalization)
        if len(decoder_blocks) != len(strides):
            raise ValueError(
                f"decoder_blocks has {len(decoder_blocks)} entries but strides has {len(strides)}: give one "
                f"block count per stride, e.g. --model.decoder_blocks {list((6, 4, 3)[-len(strides) :])}"
            )
        channels = [int(c) for c in self.backbone.channels]
        self.strides, self.channels = strides, channels
        self.embedding_channels = int(embedding_channels or 2 * channels[-1])
        self.loss_mode, self.map_mode, self.sigma = loss_mode, map_mode, float(sigma)
        with seeded(seed):
            self.bottleneck = OneClassBottleneck(
                channels, strides, self.embedding_channels, oce_blocks, embedding_width
            )
            self.decoder = StudentDecoder(
                channels, strides, self.embedding_channels, list(decoder_blocks), linear_output
            )
            for m in [*self.bottleneck.modules(), *self.decoder.modules()]:
                if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    @property
    def teacher(self) -> Backbone:
        """The frozen teacher encoder (``backbone``, the name adx's feature cache and tiling checks read)."""
        return self.backbone

    def frozen_features(self, images: Tensor) -> list[Tensor]:
        """Images [B,3,H,W] in [0,1] -> the teacher's maps [B,C_i,H/s_i,W/s_i] (float32, contiguous)."""
        with torch.no_grad():
            feats = self.backbone(images)
        return [f.float().contiguous() for f in feats]

    def student(self, feats: list[Tensor]) -> list[Tensor]:
        """Teacher maps -> the student's restored maps of the same shapes (through the one-class embedding)."""
        return self.decoder(self.bottleneck(feats), feats)

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Sum over maps of the batch mean of 1 - cosine(teacher, student) (``loss_mode`` says over what)."""
        feats = batch.get("features")
        if feats is None:
            feats = self.frozen_features(batch["image"])
        total = torch.zeros((), device=feats[0].device)
        for t, s in zip(feats, self.student(feats), strict=True):
            t, s = t.float(), s.float()
            if self.loss_mode == "sample":
                cos = F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)
            else:
                cos = F.cosine_similarity(t, s, dim=1).flatten(1).mean(dim=1)
            total = total + (1.0 - cos).mean()
        return total

    def distance_maps(self, feats: list[Tensor], students: list[Tensor]) -> list[Tensor]:
        """Per map 1 - cosine similarity along the channels [B,h_i,w_i] (0: restored, up to 2: opposite)."""
        return [
            1.0 - F.cosine_similarity(t.float(), s.float(), dim=1)
            for t, s in zip(feats, students, strict=True)
        ]

    def anomaly_map(self, distances: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Distance maps upsampled (bilinear) to ``size``, summed or multiplied, then blurred [B,H,W]."""
        out = upsample_and_combine(distances, size, multiply=self.map_mode == "multiply")
        return gaussian_smooth(out, self.sigma)

    def check_fitted(self) -> None:
        """Raise RuntimeError unless the bottleneck and decoder were trained."""
        if int(self.trained_steps) == 0:
            raise RuntimeError(
                "ReverseDistillation has not been trained: fit it (adx fit) or load a checkpoint"
            )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] -> image scores [B] (the map's maximum) and anomaly maps [B,H,W]."""
        feats = self.frozen_features(images)
        size = (images.shape[-2], images.shape[-1])
        anomaly_map = self.anomaly_map(self.distance_maps(feats, self.student(feats)), size)
        return anomaly_map.flatten(1).amax(dim=1), anomaly_map
