"""EfficientAD (Batzner, Heckler and König, WACV 2024, arXiv 2303.14535) as a plain torch module."""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.models.components.input_size import input_sizes
from adx.models.components.provenance import RecordsSources
from adx.models.components.seeding import batch_seeds, mix, seeded
from adx.models.components.sources import NaturalImages
from adx.models.efficient_ad.networks import MODEL_SIZES, AutoEncoder, ModelSize, pdn, pdn_output_size
from adx.models.efficient_ad.teacher import (
    FORMAT,
    DistillationTarget,
    build_extractor,
    cache_root,
    distill,
    distilled_record,
    file_record,
    key_of,
    load_teacher,
    save_teacher,
    timed,
)

CHANNELS = 384  # teacher output channels; the student has twice as many
MIN_SIZE = 64
"""Smallest image (or tile) side: the autoencoder's encoder halves the image five times."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_size(size: Sequence[int], flag: str) -> None:
    """Raise ValueError unless both sides are at least 64 px."""
    h, w = (int(v) for v in size)
    if min(h, w) < MIN_SIZE:
        raise ValueError(
            f"EfficientAD needs image sides of at least {MIN_SIZE} px, got {h}x{w}: use e.g. {flag} 256"
        )


def quantile(values: Tensor, q: float) -> Tensor:
    """The q-quantile of all elements (linear interpolation, as torch.quantile) without its 16 M element cap."""
    flat = values.flatten().float()
    pos = q * (flat.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, flat.numel() - 1)
    a, b = flat.kthvalue(lo + 1).values, flat.kthvalue(hi + 1).values
    return a + (b - a) * (pos - lo)


def hard_mean(distances: Tensor, q: float) -> Tensor:
    """Mean of the elements of ``distances`` at or above its q-quantile (the paper's hard-feature loss)."""
    flat = distances.flatten()
    k = max(1, flat.numel() - math.ceil(q * (flat.numel() - 1)))  # the sorted positions >= the quantile's
    return flat.topk(k, sorted=False).values.mean()


def colour_jitter(image: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """One of brightness, contrast or saturation, factor uniform in [1 - strength, 1 + strength] ([3,H,W] in [0,1])."""
    choice = int(torch.randint(0, 3, (), generator=generator))
    factor = 1.0 + strength * (2.0 * float(torch.rand((), generator=generator)) - 1.0)
    gray = (image * image.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    if choice == 0:
        out = image * factor
    elif choice == 1:
        out = (image - gray.mean()) * factor + gray.mean()
    else:
        out = (image - gray) * factor + gray
    return out.clamp(0.0, 1.0)


class TeacherCard:
    """What the run records and the export metadata read as the model's ``backbone`` (the teacher)."""

    strides: tuple[int, ...] = ()  # no stride constraint on tiles

    def __init__(self, name: str, record: dict[str, Any]) -> None:
        self.name = name
        kind = record.get("kind")
        if kind == "file":
            self.weights_source, self.weights_sha256 = (
                f"teacher file {record.get('file')}",
                record.get("sha256", ""),
            )
        elif kind == "distilled":
            self.weights_source = (
                f"distilled here from {record.get('extractor')} ({record.get('steps')} steps on "
                f"{record.get('images', {}).get('name')}); {record.get('cache_file', '')}"
            )
            self.weights_sha256 = record.get("sha256", "")
        else:
            self.weights_source, self.weights_sha256 = "teacher not prepared yet", ""


class EfficientAdModel(RecordsSources, nn.Module):
    """PDN teacher (frozen, distilled), PDN student (2 x 384 channels) and autoencoder; two maps, one score."""

    def __init__(
        self,
        model_size: ModelSize = "small",
        padding: bool = True,
        hard_quantile: float = 0.999,
        penalty_weight: float = 1.0,
        penalty_images: str | None = None,
        penalty_grayscale: float = 0.3,
        augment_strength: float = 0.2,
        map_quantiles: tuple[float, float] = (0.9, 0.995),
        teacher_weights: str | None = None,
        backbone: str = "tf_efficientnet_lite0",
        strides: Sequence[int] = (8, 16),
        blocks: list[int] | str | None = None,
        weights: str | None = None,
        pretrained: bool = True,
        normalization: str = "backbone",
        teacher_steps: int = 40,
        teacher_batch_size: int = 8,
        teacher_crop_size: int = 128,
        teacher_lr: float = 1e-3,
        teacher_scale: float = 2.0,
        teacher_cache: str | None = None,
        seed: int = 0,
    ) -> None:
        """EfficientAD.

        Args:
            model_size: ``small`` (EfficientAD-S) or ``medium`` (EfficientAD-M): the PDN of teacher and student.
            padding: the paper's PDN paddings (64 x 64 maps for 256 px); False: none (56 x 56, as some public
                implementations; the maps are then zero-padded to the stride-4 grid before resizing).
            hard_quantile: the hard-feature loss keeps the squared student-teacher differences at or above this
                quantile (paper: 0.999).
            penalty_weight: weight of the penalty (mean squared student output on a natural image; paper: 1);
                0 turns it off.
            penalty_images: folder of natural images for the penalty (paper: ImageNet); None: the offline
                natural-image source (scikit-image's photographs).
            penalty_grayscale: probability that a penalty image is turned grey.
            augment_strength: the autoencoder's training images get one of brightness, contrast, saturation
                with a factor in [1 - s, 1 + s] (paper: 0.2).
            map_quantiles: (a, b): each map is normalised so that its a-quantile on held-out normal images
                goes to 0 and its b-quantile to 0.1 (paper: 0.9, 0.995).
            teacher_weights: a PDN state dict file (``0.weight``, ``0.bias``, ``3.weight``, ... of the
                ``nn.Sequential`` in ``networks.pdn``, 384 output channels; or a file adx wrote) used as
                the teacher instead of distilling one. Read at fit start.
            backbone, strides, blocks, weights, pretrained, normalization: the feature extractor the teacher
                is distilled from (docs/offline.md); a CNN's maps by stride, or a ViT's blocks
                (``blocks: auto`` for ``vit_small_patch14_dinov2``). The paper uses WideResNet-101.
            teacher_steps, teacher_batch_size, teacher_crop_size, teacher_lr: the distillation (Adam steps,
                crops per step, crop side, learning rate; paper: 60 000 steps of 16 ImageNet images at 256 px,
                lr 1e-4, not affordable on a CPU).
            teacher_scale: the extractor sees each crop enlarged this many times (its stride-8 map on the
                PDN's stride-4 grid; the paper feeds its extractor 512 px for 256 px crops).
            teacher_cache: folder of distilled teachers (None: ``$ADX_CACHE_DIR/efficientad`` or
                ``~/.cache/adx/efficientad``).
            seed: seed of the initial weights, the distillation and the per-step penalty images and augmentations.
        """
        super().__init__()
        if model_size not in MODEL_SIZES:
            raise ValueError(
                f"model_size must be 'small' or 'medium', got {model_size!r}: fix --model.model_size"
            )
        ranges = [  # (name, value, ok, bounds, example)
            ("hard_quantile", hard_quantile, 0.0 <= hard_quantile < 1.0, "in [0, 1)", "0.999"),
            ("penalty_weight", penalty_weight, penalty_weight >= 0, ">= 0", "1.0"),
            ("penalty_grayscale", penalty_grayscale, 0.0 <= penalty_grayscale <= 1.0, "in [0, 1]", "0.3"),
            ("augment_strength", augment_strength, 0.0 <= augment_strength < 1.0, "in [0, 1)", "0.2"),
            ("teacher_lr", teacher_lr, teacher_lr > 0, "> 0", "1e-3"),
            ("teacher_scale", teacher_scale, teacher_scale > 0, "> 0", "2.0"),
        ]
        for name, value, ok, bounds, example in ranges:
            if not ok:
                raise ValueError(f"{name} must be {bounds}, got {value!r}: e.g. --model.{name} {example}")
        for name, value, low in (
            ("teacher_steps", teacher_steps, 1),
            ("teacher_batch_size", teacher_batch_size, 1),
            ("teacher_crop_size", teacher_crop_size, MIN_SIZE),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"{name} must be an integer >= {low}, got {value!r}: e.g. --model.{name} {low * 2}"
                )
        qa, qb = (float(v) for v in map_quantiles)
        if len(map_quantiles) != 2 or not 0.0 <= qa < qb <= 1.0:
            raise ValueError(
                f"map_quantiles must be [a, b] with 0 <= a < b <= 1, got {list(map_quantiles)}: "
                "e.g. --model.map_quantiles [0.9,0.995]"
            )
        # the extractor is only needed to distil a teacher at fit start; building it here checks the name and
        # strides before any work (random weights: nothing is read)
        with seeded(seed):
            build_extractor(backbone, strides, blocks, None, False, normalization, optimize=False)
        self.model_size, self.padding = model_size, bool(padding)
        self.hard_quantile, self.penalty_weight = float(hard_quantile), float(penalty_weight)
        self.penalty_images, self.penalty_grayscale = penalty_images or None, float(penalty_grayscale)
        self.augment_strength, self.map_quantiles = float(augment_strength), (qa, qb)
        self.teacher_weights = teacher_weights or None
        self.extractor_settings = {
            "backbone": backbone,
            "strides": [int(s) for s in strides],
            "blocks": blocks if isinstance(blocks, str) or blocks is None else [int(b) for b in blocks],
            "weights": weights or None,
            "pretrained": bool(pretrained),
            "normalization": normalization,
        }
        self.teacher_steps, self.teacher_batch_size = teacher_steps, teacher_batch_size
        self.teacher_crop_size, self.teacher_lr = teacher_crop_size, float(teacher_lr)
        self.teacher_scale, self.teacher_cache, self.seed = float(teacher_scale), teacher_cache or None, seed
        with seeded(seed):
            self.teacher = pdn(model_size, CHANNELS, self.padding)
            self.student = pdn(model_size, 2 * CHANNELS, self.padding)
            self.autoencoder = AutoEncoder(CHANNELS)
        self.teacher.requires_grad_(False)
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("teacher_mean", torch.zeros(1, CHANNELS, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, CHANNELS, 1, 1))
        # [a-quantile, b-quantile] of the student-teacher and the student-autoencoder map on held-out normal images
        self.register_buffer("quantiles_st", torch.tensor([0.0, 1.0]))
        self.register_buffer("quantiles_ae", torch.tensor([0.0, 1.0]))
        self.register_buffer("teacher_ready", torch.zeros((), dtype=torch.long))
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.long))
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))
        self._sources: dict[str, Any] = {}
        self._penalty: NaturalImages | None = None
        self.loss_terms: dict[str, Tensor] = {}

    # ---- the teacher ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> EfficientAdModel:
        """The teacher stays in eval mode (it has no dropout or BatchNorm, but stays frozen in every sense)."""
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def backbone(self) -> TeacherCard:
        """The teacher's name and provenance, for run records and export metadata."""
        extractor = self.extractor_settings["backbone"]
        return TeacherCard(
            f"pdn_{self.model_size} (teacher of {extractor})", self._sources.get("teacher", {})
        )

    def teacher_settings(self) -> dict[str, Any]:
        """Everything a distilled teacher depends on (the cache key hashes it with the images' provenance)."""
        return {
            "format": FORMAT,
            "model_size": self.model_size,
            "padding": self.padding,
            "channels": CHANNELS,
            "extractor": self.extractor_settings["backbone"],
            **{k: v for k, v in self.extractor_settings.items() if k != "backbone"},
            "steps": self.teacher_steps,
            "batch_size": self.teacher_batch_size,
            "crop_size": self.teacher_crop_size,
            "lr": self.teacher_lr,
            "scale": self.teacher_scale,
            "seed": self.seed,
        }

    def prepare(self, images: Tensor) -> Tensor:
        """Images [B,3,H,W] in [0,1] -> the networks' input (ImageNet mean / std)."""
        return (images - self.input_mean) / self.input_std

    def prepare_teacher(
        self, device: torch.device, log: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """Make the teacher ready: ``teacher_weights`` file > the machine's cache > distil it (and cache it).

        Does nothing once ready (a resumed or loaded model). Returns and records the teacher's provenance.
        """
        log = log or (lambda msg: print(msg, file=sys.stderr))
        if int(self.teacher_ready):
            return dict(self._sources.get("teacher", {}))
        if self.teacher_weights:
            record = file_record(self.teacher_weights, load_teacher(self.teacher, self.teacher_weights))
            log(f"adx: EfficientAD teacher from {record['file']}")
        else:
            record = self._distilled_teacher(device, log)
        self.teacher.to(device).requires_grad_(False)
        self.teacher_ready.fill_(1)
        self._sources["teacher"] = record
        return record

    def _distilled_teacher(self, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
        s = self.extractor_settings
        with seeded(self.seed):  # random extractor weights (pretrained false, tests) depend on the seed alone
            extractor = build_extractor(
                s["backbone"], s["strides"], s["blocks"], s["weights"], s["pretrained"], s["normalization"]
            )
        images = NaturalImages(
            size=self.teacher_crop_size,
            length=self.teacher_steps * self.teacher_batch_size,
            seed=mix("efficientad-teacher", self.seed),
        )
        settings = {
            **self.teacher_settings(),
            "extractor_weights": extractor.weights_source,
            "extractor_sha256": extractor.weights_sha256,
            "images": images.provenance(),
        }
        key = key_of(settings)
        path = cache_root(self.teacher_cache) / f"teacher-{key[:20]}.pt"
        if path.is_file():
            saved = load_teacher(self.teacher, path)
            log(f"adx: EfficientAD teacher from the cache {path}")
            return {**saved, "cache_file": str(path), "reused": True}
        log(
            f"adx: EfficientAD distilling its teacher from {s['backbone']} on {images.provenance()['num_files']} "
            f"natural images ({self.teacher_steps} steps of {self.teacher_batch_size} crops of "
            f"{self.teacher_crop_size} px); cached in {path}"
        )
        target = DistillationTarget(extractor, CHANNELS, self.teacher_scale, seed=self.seed)
        losses, seconds = timed(
            lambda: distill(
                self.teacher,
                self.prepare,
                target,
                images,
                self.teacher_steps,
                self.teacher_batch_size,
                self.teacher_lr,
                self.seed,
                device,
                log,
            )
        )
        digest = _state_sha256(self.teacher)
        record = {**distilled_record(settings, key, losses, seconds, device), "sha256": digest}
        save_teacher(self.teacher, path, record)
        return {**record, "cache_file": str(path), "reused": False}

    @torch.no_grad()
    def fit_teacher_stats(self, batches: Iterable[Tensor]) -> None:
        """Per-channel mean / std of the teacher's outputs over the training images (before training)."""
        total = torch.zeros(CHANNELS, dtype=torch.float64, device=self.teacher_mean.device)
        squares, count = torch.zeros_like(total), 0
        for images in batches:
            y = self.teacher(self.prepare(images.float())).double()
            total += y.sum(dim=(0, 2, 3))
            squares += y.square().sum(dim=(0, 2, 3))
            count += y.shape[0] * y.shape[2] * y.shape[3]
        if count == 0:
            raise RuntimeError("EfficientAD found no training images to measure the teacher's statistics on")
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
        self.teacher_mean.copy_(mean.view(1, -1, 1, 1).float())
        self.teacher_std.copy_(std.view(1, -1, 1, 1).float())
        self.stats_ready.fill_(1)

    def frozen_features(self, images: Tensor) -> list[Tensor]:
        """Images [B,3,H,W] in [0,1] -> [the teacher's normalised maps]: what the frozen-feature cache keeps of
        a training image (the teacher and its statistics are fixed before the first step)."""
        return [self.teacher_features(self.prepare(images)).contiguous()]

    def teacher_features(self, x: Tensor) -> Tensor:
        """Prepared images [B,3,H,W] -> the teacher's normalised maps [B,384,h,w] (float32, no gradient)."""
        with torch.no_grad():
            return (self.teacher(x).float() - self.teacher_mean) / self.teacher_std

    # ---- provenance ----------------------------------------------------------------------------
    def penalty_source(self, size: tuple[int, int]) -> NaturalImages:
        """The penalty's natural images at ``size`` (a bad ``penalty_images`` folder raises SourceError)."""
        if self._penalty is None or self._penalty.size != tuple(size):
            self._penalty = NaturalImages(
                self.penalty_images,
                size=size,
                seed=mix("efficientad-penalty", self.seed),
                grayscale=self.penalty_grayscale,
            )
            self._sources["penalty_images"] = self._penalty.provenance()
        return self._penalty

    # ---- training ------------------------------------------------------------------------------
    def augment(self, images: Tensor, seeds: Sequence[int]) -> Tensor:
        """The autoencoder's training images: each [3,H,W] through one seeded colour transform."""
        if self.augment_strength == 0:
            return images
        out = [
            colour_jitter(image, self.augment_strength, torch.Generator().manual_seed(int(s)))
            for image, s in zip(images.float(), seeds, strict=True)
        ]
        return torch.stack(out).to(images.dtype)

    def penalty_batch(self, images: Tensor, seeds: Sequence[int]) -> Tensor:
        """One natural image per training image, of its size: [B,3,H,W] in [0,1]."""
        source = self.penalty_source(tuple(images.shape[-2:]))
        crops = [source.sample(torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(crops).to(device=images.device, dtype=images.dtype)

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Hard-feature loss + penalty + autoencoder loss + student-autoencoder loss on ``batch["image"]``.

        The student sees the image, the autoencoder's (colour-jittered) image and the penalty image in one
        forward pass; the teacher's maps of the image come from ``batch["features"]`` (the frozen-feature
        cache) when present. Training batches carry ``anomaly_step`` (the step seeds the penalty images and the
        augmentations); other batches are seeded by image path.
        """
        images = batch["image"]
        n = len(images)
        seeds = batch_seeds(batch, ("efficientad", self.seed), ("efficientad-eval", self.seed))
        augmented = self.augment(images, [mix("augment", s) for s in seeds])
        parts = [images, augmented]
        if self.penalty_weight > 0:
            parts.append(self.penalty_batch(images, [mix("penalty", s) for s in seeds]))
        x = self.prepare(torch.cat(parts))
        # the teacher's maps of the (unaugmented) images, from the frozen-feature cache
        cached = batch.get("features")
        if cached is None:
            teacher = self.teacher_features(x[: 2 * n])
        else:
            teacher = torch.cat([cached[0].float(), self.teacher_features(x[n : 2 * n])])
        # every loss reads one half of the student's channels: its last conv computes only that half per part
        trunk = self.student[:-1](x)
        first = torch.cat([trunk[:n], trunk[2 * n :]])  # the image (and the penalty image): channels < 384
        student_first = _head(self.student[-1], first, slice(0, CHANNELS)).float()
        student_second = _head(self.student[-1], trunk[n : 2 * n], slice(CHANNELS, None)).float()
        autoencoder = self.autoencoder(x[n : 2 * n], _size(teacher)).float()
        hard = hard_mean((teacher[:n] - student_first[:n]).pow(2), self.hard_quantile)
        ae = (teacher[n:] - autoencoder).pow(2).mean()
        stae = (autoencoder - student_second).pow(2).mean()
        total = hard + ae + stae
        terms = {"hard": hard, "autoencoder": ae, "student_autoencoder": stae}
        if self.penalty_weight > 0:
            penalty = student_first[n:].pow(2).mean()
            total = total + self.penalty_weight * penalty
            terms["penalty"] = penalty
        self.loss_terms = {k: v.detach() for k, v in terms.items()}
        return total

    def check_datamodule(self, datamodule: Any) -> None:
        """Before fitting: the image (or tile) sides are at least 64 px."""
        for size, flag in input_sizes(datamodule):
            check_size(size, flag)

    def check_fitted(self) -> None:
        """Raise RuntimeError unless the student and autoencoder were trained."""
        if int(self.trained_steps) == 0:
            raise RuntimeError("EfficientAD has not been trained: fit it (adx fit) or load a checkpoint")

    # ---- maps ----------------------------------------------------------------------------------
    def raw_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] in [0,1] -> student-teacher and student-autoencoder maps [B,1,H,W] (raw units)."""
        x = self.prepare(images)
        teacher = self.teacher_features(x)
        student = self.student(x).float()
        autoencoder = self.autoencoder(x, _size(teacher)).float()
        st = (teacher - student[:, :CHANNELS]).pow(2).mean(dim=1, keepdim=True)
        ae = (autoencoder - student[:, CHANNELS:]).pow(2).mean(dim=1, keepdim=True)
        size = _size(images)
        return self._to_image(st, size), self._to_image(ae, size)

    def _to_image(self, maps: Tensor, size: tuple[int, int]) -> Tensor:
        """[B,1,h,w] on the PDN grid -> [B,1,H,W]: without padding the grid is first zero-padded to the
        size the padded PDN gives (its border cells), then bilinearly resized."""
        if not self.padding:
            full = pdn_output_size(size[0], size[1], padding=True)
            dh, dw = full[0] - maps.shape[-2], full[1] - maps.shape[-1]
            maps = F.pad(maps, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def fit_map_quantiles(self, batches: Iterable[Tensor]) -> int:
        """Measure the maps' ``map_quantiles`` over held-out normal images (eval mode); return the image count."""
        st_all, ae_all = [], []
        for images in batches:
            st, ae = self.raw_maps(images.float())
            st_all.append(st.cpu())
            ae_all.append(ae.cpu())
        if not st_all:
            raise RuntimeError("EfficientAD found no normal images to measure its map quantiles on")
        qa, qb = self.map_quantiles
        for maps, buffer in ((torch.cat(st_all), self.quantiles_st), (torch.cat(ae_all), self.quantiles_ae)):
            buffer.copy_(torch.stack([quantile(maps, qa), quantile(maps, qb)]).to(buffer))
        return sum(len(m) for m in st_all)

    def record_quantiles(self, record: dict[str, Any]) -> None:
        """Say where the map quantiles were measured (kept with the other provenance)."""
        self._sources["map_quantiles"] = {
            **record,
            "quantiles": list(self.map_quantiles),
            "student_teacher": [float(v) for v in self.quantiles_st],
            "student_autoencoder": [float(v) for v in self.quantiles_ae],
        }

    # ---- inference -----------------------------------------------------------------------------
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] in [0,1] -> image scores [B] (the map's maximum) and anomaly maps [B,H,W].

        Each map goes through 0.1 (m - q_a) / (q_b - q_a) with its quantiles; the anomaly map is their mean.
        """
        st, ae = self.raw_maps(images)
        st = (st - self.quantiles_st[0]) * (
            0.1 / (self.quantiles_st[1] - self.quantiles_st[0]).clamp_min(1e-12)
        )
        ae = (ae - self.quantiles_ae[0]) * (
            0.1 / (self.quantiles_ae[1] - self.quantiles_ae[0]).clamp_min(1e-12)
        )
        anomaly_map = (0.5 * (st + ae))[:, 0]
        return anomaly_map.flatten(1).amax(dim=1), anomaly_map


def _head(conv: nn.Module, x: Tensor, channels: slice) -> Tensor:
    """The output ``channels`` of the student's last layer (a Conv2d) on ``x``: the same numbers as slicing the
    full output, at the cost of the channels kept (the last conv of the small PDN is its most expensive layer)."""
    if not isinstance(conv, nn.Conv2d):
        return conv(x)[:, channels]
    bias = None if conv.bias is None else conv.bias[channels]
    return F.conv2d(x, conv.weight[channels], bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _size(x: Tensor) -> tuple[int, int]:
    """(H, W) of [..., H, W] as ints: constants of a traced graph, fixed by the fitted input size."""
    return int(x.shape[-2]), int(x.shape[-1])


def _state_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's tensors (names, shapes and float32 bytes), for provenance records."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
