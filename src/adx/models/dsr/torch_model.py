"""DSR (Zavrtanik, Kristan and Skočaj, ECCV 2022, arXiv 2208.01521) as a plain torch module."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adx
from adx.models.components.focal import focal_loss
from adx.models.components.input_size import input_sizes
from adx.models.components.provenance import RecordsSources
from adx.models.components.seeding import batch_seeds
from adx.models.components.sources import NaturalImages
from adx.models.components.weights import sha256_file
from adx.models.dsr.anomalies import ColourSmudge, TextureSmudge, draw_mask, pool_mask, replace_codes
from adx.models.dsr.networks import ObjectDecoder, SubspaceRestriction, UNet
from adx.models.dsr.vq import FORMAT, DiscreteLatentModel, load_vq, save_vq, train_vq

VQSource = Literal["natural", "category"]
Smudges = Literal["colour", "texture"]
MULTIPLE = 16
"""Image sides must be multiples of this (the object-specific decoder pools the stride-4 map twice)."""
MIN_SIZE = 64
"""Smallest side: the subspace restriction network pools the stride-8 map twice and normalises each level."""
CACHE_ENV = "ADX_CACHE_DIR"


def cache_root() -> Path:
    """Where DSR keeps its trained natural-image VQ-VAEs: ``$ADX_CACHE_DIR/dsr`` or ``~/.cache/adx/dsr``."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "adx") / "dsr"


def check_size(size: Sequence[int], flag: str) -> None:
    """Raise ValueError unless both sides are multiples of 16 and at least 64."""
    h, w = (int(v) for v in size)
    if h % MULTIPLE or w % MULTIPLE or min(h, w) < MIN_SIZE:
        near = max(MIN_SIZE, round(max(h, w) / MULTIPLE) * MULTIPLE)
        raise ValueError(
            f"DSR needs image sides that are multiples of {MULTIPLE} and at least {MIN_SIZE} px, got {h}x{w}: "
            f"use e.g. {flag} {near}"
        )


class DSRModel(RecordsSources, nn.Module):
    """VQ-VAE (general appearance) + subspace restriction and object-specific decoder + two U-Nets."""

    def __init__(
        self,
        hiddens: int = 128,
        residual_hiddens: int = 64,
        residual_layers: int = 2,
        embedding_dim: int = 128,
        codebook_size: int = 4096,
        restriction_width: int = 128,
        decoder_width: int = 256,
        detector_width: int = 64,
        vq_source: VQSource = "natural",
        vq_weights: str | None = None,
        vq_steps: int = 10000,
        vq_batch_size: int = 32,
        vq_lr: float = 2e-4,
        vq_crop_size: int = 256,
        vq_decay: float = 0.99,
        commitment: float = 0.25,
        anomaly_strength: float = 0.2,
        p_anomaly: float = 0.5,
        image_loss_weight: float = 10.0,
        focal_gamma: float = 2.0,
        upsampling_fraction: float = 1 / 3,
        upsampling_anomalies: Smudges = "colour",
        anomaly_source: str | None = None,
        opacity: tuple[float, float] = (0.2, 1.0),
        smoothing: int = 21,
        seed: int = 0,
    ) -> None:
        """DSR.

        Args:
            hiddens, residual_hiddens, residual_layers: VQ-VAE encoder/decoder channels, residual-block
                channels and residual blocks per stack (authors: 128, 64, 2); the object-specific decoder's
                tail uses the same.
            embedding_dim: codebook vector dimension D (authors: 128).
            codebook_size: vectors per codebook K, for K_lo and K_hi (authors: 4096).
            restriction_width: base width of the two subspace restriction networks (authors: D = 128).
            decoder_width: first width of the object-specific decoder (authors: 2D = 256).
            detector_width: base width of the anomaly detection and upsampling U-Nets (authors: 64).
            vq_source: what the VQ-VAE is trained on when no ``vq_weights`` are given: ``natural`` (the core's
                offline natural images, trained once per machine and cached; the paper trains it on ImageNet)
                or ``category`` (the category's own training images, every fit).
            vq_weights: a VQ-VAE weights file (adx's, or the authors' ``vq_model_pretrained_128_4096.pckl``);
                replaces the VQ-VAE training. Read at fit start; shapes must fit the settings above.
            vq_steps, vq_batch_size, vq_lr, vq_crop_size: the VQ-VAE training (Adam steps, batch, learning
                rate, natural-image crop side); not in the paper, which gives no ImageNet schedule.
            vq_decay, commitment: codebook EMA decay and commitment weight (authors: 0.99, 0.25).
            anomaly_strength: lower end of the strength drawn per image for feature-space anomalies: the
                replacement is drawn among the strength x K nearest codebook vectors (authors: 0.2).
            p_anomaly: probability that a training image gets an anomaly, in both stages (authors: 0.5).
            image_loss_weight: weight of the object-specific decoder's image MSE (authors: 10).
            focal_gamma: focusing exponent of the focal losses (authors: 2).
            upsampling_fraction: fraction of ``trainer.max_epochs`` that trains the upsampling module, after the
                main stage (authors: 50 epochs after 100, so 1/3).
            upsampling_anomalies: image-space anomalies of the upsampling stage: ``colour`` (Perlin masks filled
                with a solid colour, the authors') or ``texture`` (the core's texture source, as DRAEM).
            anomaly_source: folder of textures for ``texture`` (None: scikit-image's photographs).
            opacity: range of the image-space anomalies' opacity (authors: 1 - beta, beta in [0, 0.8)).
            smoothing: side of the mean filter over the detection module's map before the image score (max)
                is taken (authors: 21 at 256 px); 1 disables it.
            seed: seed of the initial weights, the natural-image crops and the synthetic anomalies.
        """
        super().__init__()
        for name, value in (
            ("hiddens", hiddens),
            ("residual_hiddens", residual_hiddens),
            ("residual_layers", residual_layers),
            ("embedding_dim", embedding_dim),
            ("restriction_width", restriction_width),
            ("decoder_width", decoder_width),
            ("detector_width", detector_width),
            ("vq_steps", vq_steps),
            ("vq_batch_size", vq_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}: e.g. --model.{name} 16")
        if hiddens < 2 or hiddens % 2:
            raise ValueError(f"hiddens must be even and >= 2, got {hiddens}: e.g. --model.hiddens 128")
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 2:
            raise ValueError(
                f"codebook_size must be an integer >= 2, got {codebook_size!r}: e.g. --model.codebook_size 4096"
            )
        if vq_source not in ("natural", "category"):
            raise ValueError(
                f"vq_source must be 'natural' or 'category', got {vq_source!r}: fix --model.vq_source"
            )
        if upsampling_anomalies not in ("colour", "texture"):
            raise ValueError(
                f"upsampling_anomalies must be 'colour' or 'texture', got {upsampling_anomalies!r}: "
                "fix --model.upsampling_anomalies"
            )
        if vq_crop_size % MULTIPLE or vq_crop_size < MIN_SIZE:
            raise ValueError(
                f"vq_crop_size must be a multiple of {MULTIPLE} and >= {MIN_SIZE}, got {vq_crop_size}: "
                "e.g. --model.vq_crop_size 256"
            )
        ranges = [  # (name, value, in range, the range, an example)
            ("vq_lr", vq_lr, vq_lr > 0, "> 0", "2e-4"),
            ("vq_decay", vq_decay, 0.0 < vq_decay < 1.0, "in (0, 1)", "0.99"),
            ("commitment", commitment, commitment >= 0, ">= 0", "0.25"),
            ("anomaly_strength", anomaly_strength, 0.0 <= anomaly_strength <= 1.0, "in [0, 1]", "0.2"),
            ("p_anomaly", p_anomaly, 0.0 <= p_anomaly <= 1.0, "in [0, 1]", "0.5"),
            ("image_loss_weight", image_loss_weight, image_loss_weight >= 0, ">= 0", "10"),
            ("focal_gamma", focal_gamma, focal_gamma >= 0, ">= 0", "2"),
            (
                "upsampling_fraction",
                upsampling_fraction,
                0.0 < upsampling_fraction < 1.0,
                "in (0, 1)",
                "0.333",
            ),
        ]
        for name, value, ok, bounds, example in ranges:
            if not ok:
                raise ValueError(f"{name} must be {bounds}, got {value!r}: e.g. --model.{name} {example}")
        if len(opacity) != 2 or not 0.0 <= opacity[0] <= opacity[1] <= 1.0:
            raise ValueError(
                f"opacity must be [low, high] with 0 <= low <= high <= 1, got {list(opacity)}: "
                "e.g. --model.opacity [0.2,1.0]"
            )
        odd = isinstance(smoothing, int) and not isinstance(smoothing, bool) and smoothing % 2 == 1
        if not (odd and smoothing >= 1):
            raise ValueError(
                f"smoothing must be an odd integer >= 1 (mean filter side), got {smoothing!r}: "
                "e.g. --model.smoothing 21"
            )
        self.vq_source, self.vq_weights = vq_source, vq_weights or None
        self.vq_steps, self.vq_batch_size, self.vq_lr = vq_steps, vq_batch_size, float(vq_lr)
        self.vq_crop_size, self.commitment = vq_crop_size, float(commitment)
        self.anomaly_strength, self.p_anomaly = float(anomaly_strength), float(p_anomaly)
        self.image_loss_weight, self.focal_gamma = float(image_loss_weight), float(focal_gamma)
        self.upsampling_fraction = float(upsampling_fraction)
        self.upsampling_anomalies, self.anomaly_source = upsampling_anomalies, anomaly_source or None
        self.opacity = (float(opacity[0]), float(opacity[1]))
        self.smoothing, self.seed = smoothing, seed
        self.architecture = {
            "hiddens": hiddens,
            "residual_hiddens": residual_hiddens,
            "residual_layers": residual_layers,
            "embedding_dim": embedding_dim,
            "codebook_size": codebook_size,
            "decay": float(vq_decay),
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vq = DiscreteLatentModel(**self.architecture)
            self.restrict_lo = SubspaceRestriction(embedding_dim, restriction_width)
            self.restrict_hi = SubspaceRestriction(embedding_dim, restriction_width)
            self.object_decoder = ObjectDecoder(
                embedding_dim, decoder_width, hiddens, residual_hiddens, residual_layers
            )
            self.detector = UNet(6, 2, detector_width)
            self.upsampler = UNet(8, 2, detector_width)
        self.vq.requires_grad_(False)  # trained only inside train_vq, frozen in both DSR stages
        self.register_buffer("vq_ready", torch.zeros((), dtype=torch.long))
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))
        self.stage = 1
        self._smudges: ColourSmudge | TextureSmudge | None = None
        self._sources: dict[str, Any] = {}
        self.loss_terms: dict[str, Tensor] = {}

    # ---- stages ------------------------------------------------------------------------------
    def stage1_parameters(self) -> list[nn.Parameter]:
        """Main stage: subspace restriction networks, object-specific decoder, anomaly detection module."""
        parts = (self.restrict_lo, self.restrict_hi, self.object_decoder, self.detector)
        return [p for m in parts for p in m.parameters()]

    def stage2_parameters(self) -> list[nn.Parameter]:
        """Upsampling stage: the upsampling module only."""
        return list(self.upsampler.parameters())

    def stage1_epochs(self, max_epochs: int | None) -> int:
        """Epochs of the main stage: round((1 - upsampling_fraction) x max_epochs), leaving >= 1 to each stage."""
        if max_epochs is None or max_epochs < 2:
            raise ValueError(
                f"DSR trains in two stages (main, then upsampling module) of whole epochs and needs "
                f"--trainer.max_epochs >= 2, got {max_epochs}"
            )
        return min(max_epochs - 1, max(1, round((1.0 - self.upsampling_fraction) * max_epochs)))

    def stage_of(self, epoch: int, max_epochs: int | None) -> int:
        """1 (main stage) or 2 (upsampling module) for 0-based ``epoch``."""
        return 1 if epoch < self.stage1_epochs(max_epochs) else 2

    # ---- the VQ-VAE --------------------------------------------------------------------------
    def vq_settings(self) -> dict[str, Any]:
        """Everything the trained VQ-VAE depends on (the natural-image cache key hashes it)."""
        return {
            "format": FORMAT,
            **self.architecture,
            "commitment": self.commitment,
            "steps": self.vq_steps,
            "batch_size": self.vq_batch_size,
            "lr": self.vq_lr,
            "seed": self.seed,
        }

    def prepare_vq(
        self,
        device: torch.device,
        category_batches: Callable[[], Iterable[dict[str, Any]]] | None = None,
        category: dict[str, Any] | None = None,
        num_workers: int = 0,
        log: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Make the VQ-VAE ready: ``vq_weights`` file > natural-image cache (else train and cache) > category.

        Does nothing once ready (a resumed or loaded model). Returns and records the VQ-VAE's provenance.
        """
        log = log or (lambda msg: print(msg, file=sys.stderr))
        if int(self.vq_ready):
            return dict(self._sources.get("vq", {}))
        if self.vq_weights:
            path = Path(self.vq_weights).expanduser().resolve()
            saved = load_vq(self.vq, path)
            record = {"kind": "file", "file": str(path), "sha256": sha256_file(path), "saved": saved or None}
            log(f"adx: DSR VQ-VAE from {path}")
        elif self.vq_source == "natural":
            record = self._natural_vq(device, num_workers, log)
        else:
            if category_batches is None:
                raise RuntimeError(
                    "DSR vq_source 'category' needs the training images: fit with a data module"
                )
            log(f"adx: DSR training its VQ-VAE on the category's training images ({self.vq_steps} steps)")
            losses = train_vq(
                self.vq,
                _Images(category_batches, device),
                self.vq_steps,
                self.vq_lr,
                self.commitment,
                self.seed,
                log,
            )
            record = {
                "kind": "category",
                **(category or {}),
                **self.vq_settings(),
                "final_loss": _tail(losses),
            }
        self.vq_ready.fill_(1)
        self._sources["vq"] = record
        return record

    def _natural_vq(
        self, device: torch.device, num_workers: int, log: Callable[[str], None]
    ) -> dict[str, Any]:
        images = NaturalImages(
            size=self.vq_crop_size, length=self.vq_steps * self.vq_batch_size, seed=self.seed
        )
        settings = {**self.vq_settings(), "crop_size": self.vq_crop_size, "images": images.provenance()}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        path = cache_root() / f"vq-{key[:20]}.pt"
        if path.is_file():
            saved = load_vq(self.vq, path)
            log(f"adx: DSR VQ-VAE from the cache {path}")
            return {**saved, "cache_file": str(path), "reused": True}
        log(
            f"adx: DSR training its VQ-VAE on {images.provenance()['num_files']} natural images "
            f"({images.provenance()['kind']}, {self.vq_steps} steps of {self.vq_batch_size} crops); cached in {path}"
        )
        loader = (
            torch.utils.data.DataLoader(  # its own generator: the global RNG stays as a cached run leaves it
                images,
                batch_size=self.vq_batch_size,
                num_workers=num_workers,
                generator=torch.Generator().manual_seed(self.seed),
            )
        )
        losses = train_vq(
            self.vq,
            _Images(lambda: loader, device),
            self.vq_steps,
            self.vq_lr,
            self.commitment,
            self.seed,
            log,
        )
        record = {
            "kind": "natural",
            **settings,
            "key": key,
            "final_loss": _tail(losses),
            "torch": str(torch.__version__),
            "adx": adx.__version__,
            "device": str(device),
        }
        save_vq(self.vq, path, record)
        return {**record, "cache_file": str(path), "reused": False}

    # ---- provenance ----------------------------------------------------------------------------
    def smudges(self) -> ColourSmudge | TextureSmudge:
        """The upsampling stage's image-space anomalies (a bad ``anomaly_source`` raises SourceError here)."""
        if self._smudges is None:
            if self.upsampling_anomalies == "colour":
                self._smudges = ColourSmudge(self.opacity, self.p_anomaly)
            else:
                self._smudges = TextureSmudge(self.anomaly_source, self.opacity, self.p_anomaly)
            self._sources["anomalies"] = self._smudges.provenance()
        return self._smudges

    def anomaly_seeds(self, batch: dict[str, Any], kind: str) -> list[int]:
        """One generator seed per image: by (seed, step, rank, index) in training, by image path otherwise."""
        return batch_seeds(batch, ("dsr", kind, self.seed), ("dsr-eval", kind, self.seed))

    # ---- synthetic anomalies -------------------------------------------------------------------
    @torch.no_grad()
    def synthesize_features(self, images: Tensor, seeds: Sequence[int]) -> dict[str, Tensor]:
        """Anomalies in the quantised feature space of images [B,3,H,W] (main stage, authors' three modes).

        Per image: with p = ``p_anomaly`` a Perlin mask; then, with p = 1/2, anomalies in Q_lo and, over the
        Q_hi re-quantised from them, in Q_hi (target: the lo-resolution mask); else in Q_lo only (target the
        lo mask) or in Q_hi only (target the hi mask), each with p = 1/4. Returns the clean q_lo, q_hi, the
        anomalous a_lo, a_hi, the general decoder's image of the anomalous maps and the target [B,1,H,W].
        """
        with torch.autocast(images.device.type, enabled=False):
            images = images.float()
            f = self.vq.quantized(images)
            b, _, h, w = images.shape
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
            masks, s_lo, s_hi, both, lo_only = [], [], [], [], []
            for g in gens:
                has = float(torch.rand((), generator=g)) < self.p_anomaly
                masks.append(draw_mask(h, w, g) if has else torch.zeros(1, h, w))
                s_lo.append(
                    self.anomaly_strength + (1 - self.anomaly_strength) * float(torch.rand((), generator=g))
                )
                s_hi.append(
                    self.anomaly_strength + (1 - self.anomaly_strength) * float(torch.rand((), generator=g))
                )
                both.append(float(torch.rand((), generator=g)) < 0.5)
                lo_only.append(float(torch.rand((), generator=g)) < 0.5)
            mask = torch.stack(masks).to(images)
            m_lo, m_hi = pool_mask(mask, f["q_lo"].shape[-2:]), pool_mask(mask, f["q_hi"].shape[-2:])
            sel_both = torch.tensor(both, device=images.device).view(b, 1, 1, 1)
            sel_lo = torch.tensor(
                [lo and not bo for lo, bo in zip(lo_only, both, strict=True)], device=images.device
            )
            sel_lo = sel_lo.view(b, 1, 1, 1)
            sel_hi = ~(sel_both | sel_lo)
            cb_lo, cb_hi = self.vq.codebook_lo.vectors, self.vq.codebook_hi.vectors
            # Q_lo altered where the image is in the 'both' or 'lo only' mode
            a_lo = replace_codes(f["z_lo"], f["q_lo"], cb_lo, m_lo * ~sel_hi, s_lo, gens)
            # 'both': Q_hi re-quantised from the altered Q_lo, then altered itself
            z_hi_def = self.vq.hi_features(f["enc_hi"], a_lo)
            q_hi_def = self.vq.codebook_hi.lookup(self.vq.codebook_hi.indices(z_hi_def))
            a_hi_both = replace_codes(z_hi_def, q_hi_def, cb_hi, m_hi * sel_both, s_hi, gens)
            a_hi_only = replace_codes(f["z_hi"], f["q_hi"], cb_hi, m_hi * sel_hi, s_hi, gens)
            a_hi = torch.where(sel_both, a_hi_both, torch.where(sel_hi, a_hi_only, f["q_hi"]))
            a_lo = torch.where(sel_hi, f["q_lo"], a_lo)
            target = torch.where(
                sel_hi,
                F.interpolate(m_hi, size=(h, w), mode="nearest"),
                F.interpolate(m_lo, size=(h, w), mode="nearest"),
            )
            general = self.vq.decode(a_lo, a_hi)
        return {
            "q_lo": f["q_lo"],
            "q_hi": f["q_hi"],
            "a_lo": a_lo,
            "a_hi": a_hi,
            "general": general,
            "target": target,
            "mask_lo": m_lo,
            "mask_hi": m_hi,
            # 0: both maps altered, 1: Q_lo only, 2: Q_hi only
            "mode": torch.where(sel_both, 0, torch.where(sel_lo, 1, 2)).view(b),
        }

    @torch.no_grad()
    def synthesize_images(self, images: Tensor, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Image-space anomalies (upsampling stage): corrupted images [B,3,H,W] and masks [B,1,H,W]."""
        smudge = self.smudges()
        out, masks = [], []
        for image, seed in zip(images.detach().float().cpu(), seeds, strict=True):
            corrupted, mask = smudge(image, torch.Generator().manual_seed(int(seed)))
            out.append(corrupted.clamp(0.0, 1.0))
            masks.append(mask)
        return torch.stack(out).to(images.device), torch.stack(masks).to(images.device)

    # ---- the networks --------------------------------------------------------------------------
    def restore(self, q_lo: Tensor, q_hi: Tensor, straight_through: bool = False) -> tuple[Tensor, ...]:
        """Subspace restriction: (features r_lo, r_hi and their re-quantised maps) of quantised maps."""
        r_lo, r_hi = self.restrict_lo(q_lo), self.restrict_hi(q_hi)
        if straight_through:
            rq_lo, rq_hi = self.vq.codebook_lo.quantize(r_lo)[0], self.vq.codebook_hi.quantize(r_hi)[0]
        else:
            rq_lo = self.vq.codebook_lo.lookup(self.vq.codebook_lo.indices(r_lo)).to(r_lo.dtype)
            rq_hi = self.vq.codebook_hi.lookup(self.vq.codebook_hi.indices(r_hi)).to(r_hi.dtype)
        return r_lo, r_hi, rq_lo, rq_hi

    def object_image(self, rq_lo: Tensor, rq_hi: Tensor) -> Tensor:
        """Object-specific appearance decoder: restored quantised maps -> image [B,3,H,W]."""
        return self.object_decoder(torch.cat([self.vq.upsample_lo(rq_lo), rq_hi], dim=1))

    def detect(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(object-specific image, general image, detection module softmax [B,2,H,W]) of images [B,3,H,W]."""
        f = self.vq.quantized(images)
        general = self.vq.decode(f["q_lo"], f["q_hi"])
        obj = self.object_image(*self.restore(f["q_lo"], f["q_hi"])[2:])
        return obj, general, torch.softmax(self.detector(torch.cat([obj, general], dim=1)), dim=1)

    # ---- training ------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> Tensor:
        """The current stage's loss on ``batch["image"]`` [B,3,H,W] in [0,1] (``self.stage``: 1 or 2)."""
        return self.stage1_loss(batch) if self.stage == 1 else self.stage2_loss(batch)

    def stage1_loss(self, batch: dict[str, Any]) -> Tensor:
        """MSE(r_lo, Q_lo) + MSE(r_hi, Q_hi) + w MSE(object image, image) + focal(detection, target)."""
        images = batch["image"]
        s = self.synthesize_features(images, self.anomaly_seeds(batch, "features"))
        r_lo, r_hi, rq_lo, rq_hi = self.restore(s["a_lo"], s["a_hi"], straight_through=True)
        obj = self.object_image(rq_lo, rq_hi)
        logits = self.detector(torch.cat([obj.detach(), s["general"]], dim=1))
        feat = F.mse_loss(r_lo.float(), s["q_lo"]) + F.mse_loss(r_hi.float(), s["q_hi"])
        image = F.mse_loss(obj.float(), images.float())
        focal = focal_loss(logits, s["target"][:, 0].long(), self.focal_gamma)
        self.loss_terms = {"features": feat.detach(), "image": image.detach(), "focal": focal.detach()}
        return feat + self.image_loss_weight * image + focal

    def stage2_loss(self, batch: dict[str, Any]) -> Tensor:
        """Focal loss of the upsampling module on image-space anomalies (everything else frozen)."""
        corrupted, masks = self.synthesize_images(batch["image"], self.anomaly_seeds(batch, "images"))
        with torch.no_grad():
            obj, general, prob = self.detect(corrupted)
        logits = self.upsampler(torch.cat([obj, general, prob], dim=1))
        focal = focal_loss(logits, masks[:, 0].long(), self.focal_gamma)
        self.loss_terms = {"upsampling_focal": focal.detach()}
        return focal

    def check_datamodule(self, datamodule: Any) -> None:
        """Before fitting: the data's image size (tile size when training on tiles) suits the networks."""
        for size, flag in input_sizes(datamodule):
            check_size(size, flag)

    def check_fitted(self) -> None:
        """Raise RuntimeError unless the networks were trained."""
        if int(self.trained_steps) == 0:
            raise RuntimeError("DSR has not been trained: fit it (adx fit) or load a checkpoint")

    # ---- inference -----------------------------------------------------------------------------
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] in [0,1] -> image scores [B] and anomaly maps [B,H,W], both in [0,1].

        Map: the upsampling module's anomaly probability. Score: maximum of the detection module's anomaly
        probability after a ``smoothing`` x ``smoothing`` mean filter (the authors' evaluation).
        """
        obj, general, prob = self.detect(images)
        refined = torch.softmax(self.upsampler(torch.cat([obj, general, prob], dim=1)), dim=1)
        pad = self.smoothing // 2
        smooth = F.avg_pool2d(prob[:, 1:], self.smoothing, stride=1, padding=pad)
        return smooth.flatten(1).amax(dim=1), refined[:, 1]


@torch.no_grad()
def quantization_margins(model: DSRModel, images: Tensor) -> dict[str, Tensor]:
    """Per position, the gap between the nearest and second-nearest codebook vector, relative to the
    distances' scale (|e|^2 + 2|z||e| of the nearest), at the four argmins of inference: [B*h*w] each.

    A gap near float32 rounding (1e-7 .. 1e-6) is where another runtime could pick the other vector.
    """
    out: dict[str, Tensor] = {}

    def gap(book: Any, z: Tensor, name: str) -> None:
        out[name] = book.relative_gaps(z).flatten()

    f = model.vq.quantized(images)
    gap(model.vq.codebook_lo, f["z_lo"], "q_lo")
    gap(model.vq.codebook_hi, f["z_hi"], "q_hi")
    r_lo, r_hi = model.restrict_lo(f["q_lo"]), model.restrict_hi(f["q_hi"])
    gap(model.vq.codebook_lo, r_lo, "restored_lo")
    gap(model.vq.codebook_hi, r_hi, "restored_hi")
    return out


class _Images:
    """Re-iterable image batches on ``device`` from a loader factory (dict batches or plain tensors)."""

    def __init__(self, loader: Callable[[], Iterable[Any]], device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self.loader():
            images = batch["image"] if isinstance(batch, dict) else batch
            yield images.to(self.device).float()


def _tail(losses: list[float], n: int = 10) -> float:
    """Mean of the last ``n`` losses."""
    tail = losses[-n:]
    return float(sum(tail) / max(1, len(tail)))
