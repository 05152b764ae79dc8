"""DRAEM (Zavrtanik et al., ICCV 2021, arXiv 2108.07610) as a plain torch module."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.models.components.focal import focal_loss
from adx.models.components.input_size import input_sizes
from adx.models.components.precise_bn import recompute_batchnorm
from adx.models.components.provenance import RecordsSources
from adx.models.components.seeding import batch_seeds
from adx.models.components.sources import PerlinAnomaly
from adx.models.components.sources.augment import relight
from adx.models.components.ssim import ssim

MIN_SIZE = 32
"""Smallest image side: the discriminative U-Net halves the input five times."""


def _conv_pair(cin: int, mid: int, cout: int) -> nn.Sequential:
    """3x3 conv cin -> mid, then 3x3 conv mid -> cout, each followed by BatchNorm + ReLU; same size."""
    return nn.Sequential(
        nn.Conv2d(cin, mid, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU layers, cin -> cout -> cout channels, same size."""
    return _conv_pair(cin, cout, cout)


class _Up(nn.Module):
    """Bilinear upsampling to a given size, then 3x3 conv + BatchNorm + ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


class _Encoder(nn.Module):
    """Conv blocks of the given widths with a 2x2 max-pool between them; returns every level's output."""

    def __init__(self, cin: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _conv_block(a, b) for a, b in zip([cin, *widths[:-1]], widths, strict=True)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = []
        for i, block in enumerate(self.blocks):
            x = block(F.max_pool2d(x, 2) if i else x)
            levels.append(x)
        return levels


class ReconstructiveNet(nn.Module):
    """Encoder-decoder without skip connections: [B,C,H,W] -> [B,C,H,W].

    Encoder widths w, 2w, 4w, 8w, 8w (2x2 max-pool between levels). Each decoder level upsamples, convolves
    at the incoming width and narrows to the next level's width in its second conv: 8w -> 4w -> 2w -> w -> w
    (the channel plan of the authors' code). With no skips every detail has to pass the 1/16-size
    bottleneck, so the network learns to redraw normal appearance rather than copy its input.
    """

    def __init__(self, channels: int = 3, width: int = 128) -> None:
        super().__init__()
        widths = [width * m for m in (1, 2, 4, 8, 8)]
        self.encoder = _Encoder(channels, widths)
        levels = list(reversed(range(len(widths) - 1)))  # 3, 2, 1, 0
        self.ups = nn.ModuleList(_Up(widths[i], widths[i]) for i in levels)
        self.blocks = nn.ModuleList(_conv_pair(widths[i], widths[i], widths[max(i - 1, 0)]) for i in levels)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        levels = self.encoder(x)
        y = levels[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(levels[:-1]), strict=True):
            y = block(up(y, skip.shape[-2:]))  # only the level's size is used, not its content
        return self.out(y)


class DiscriminativeNet(nn.Module):
    """U-Net with skip connections: [B,cin,H,W] -> logits [B,classes,H,W].

    Encoder widths w, 2w, 4w, 8w, 8w, 8w. Going up, level j's upsampling conv narrows to the width of the
    encoder level below it (8w, 4w, 2w, w, w from the bottom), then two convs fuse it with level j's skip
    (the channel plan of the authors' code).
    """

    def __init__(self, cin: int = 6, classes: int = 2, width: int = 64) -> None:
        super().__init__()
        widths = [width * m for m in (1, 2, 4, 8, 8, 8)]
        self.encoder = _Encoder(cin, widths)
        levels = list(reversed(range(len(widths) - 1)))  # 4, 3, 2, 1, 0
        outs = {j: widths[max(j - 1, 0)] for j in levels}
        incoming = [widths[-1], *(outs[j] for j in levels[:-1])]
        self.ups = nn.ModuleList(_Up(c, outs[j]) for c, j in zip(incoming, levels, strict=True))
        self.blocks = nn.ModuleList(_conv_pair(outs[j] + widths[j], outs[j], outs[j]) for j in levels)
        self.out = nn.Conv2d(width, classes, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        levels = self.encoder(x)
        y = levels[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(levels[:-1]), strict=True):
            y = block(torch.cat([up(y, skip.shape[-2:]), skip], dim=1))
        return self.out(y)


class DraemModel(RecordsSources, nn.Module):
    """Reconstructive + discriminative sub-networks trained on synthetic Perlin anomalies."""

    def __init__(
        self,
        reconstructive_width: int = 128,
        discriminative_width: int = 64,
        anomaly_source: str | None = None,
        p_anomaly: float = 0.5,
        opacity: tuple[float, float] = (0.2, 1.0),
        grey_textures: bool = False,
        brightness: float = 0.0,
        ssim_weight: float = 1.0,
        focal_gamma: float = 2.0,
        focal_alpha: tuple[float, float] | None = None,
        smoothing: int = 21,
        precise_bn: bool = False,
        seed: int = 0,
    ) -> None:
        """DRAEM.

        Args:
            reconstructive_width: base channel width of the reconstructive encoder-decoder (paper: 128).
            discriminative_width: base channel width of the discriminative U-Net (paper: 64).
            anomaly_source: folder of texture images the anomalies are filled from (the paper: DTD,
                e.g. /data/dtd/images); None: scikit-image's bundled photographs, else procedural noise
                (docs/sources.md). Resolved when training starts, so a checkpoint loads without it.
            p_anomaly: probability that a training image gets an anomaly (authors' code: 0.5); the others
                are learnt as normal, with an empty mask.
            opacity: range of the texture's blending factor (DRAEM's 1 - beta, beta in [0, 0.8]).
            grey_textures: fill anomalies of grey images (three equal channels) with grey textures (not in
                the paper, which pastes colour textures into every image).
            brightness: scale each normal training image by a factor drawn from [1 - brightness,
                1 + brightness] before its anomaly is pasted; the scaled image is also the reconstruction
                target (not in the paper: 0). Teaches both networks that a global change of lighting is
                normal, as between a line's training and inspection days.
            ssim_weight: weight of the SSIM term in the reconstruction loss L2 + w (1 - SSIM) (paper: 1).
            focal_gamma: focusing exponent of the segmentation's focal loss (paper: 2).
            focal_alpha: weights [normal, anomalous] of the two classes' pixels in the focal loss; None
                weighs both 1 (the authors' code). anomalib 2.7 asks kornia for alpha = 1, which kornia 0.9
                reads as [0, 1]: no loss on normal pixels (docs/benchmarks.md).
            smoothing: side of the mean filter over the anomaly map before the image score (max) is taken
                (paper: 21); 1 disables it.
            precise_bn: after every epoch, recompute the BatchNorm statistics that inference uses with the
                epoch's final weights, from one pass over the (synthetically corrupted) training images (not
                in the paper, which keeps the running averages; Wu and Johnson, arXiv 2105.07576). The
                running averages lag behind fast-changing weights, which matters in short schedules.
            seed: seed of the initial weights and of the synthetic anomalies (with the training step).
        """
        super().__init__()
        for name, value in (
            ("reconstructive_width", reconstructive_width),
            ("discriminative_width", discriminative_width),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}: e.g. --model.{name} 32")
        if not 0.0 <= p_anomaly <= 1.0:
            raise ValueError(f"p_anomaly must be in [0, 1], got {p_anomaly}: e.g. --model.p_anomaly 0.5")
        if len(opacity) != 2 or not 0.0 <= opacity[0] <= opacity[1] <= 1.0:
            raise ValueError(
                f"opacity must be [low, high] with 0 <= low <= high <= 1, got {list(opacity)}: "
                "e.g. --model.opacity [0.2,1.0]"
            )
        if not 0.0 <= brightness < 1.0:
            raise ValueError(f"brightness must be in [0, 1), got {brightness!r}: e.g. --model.brightness 0.2")
        if not ssim_weight >= 0:
            raise ValueError(f"ssim_weight must be >= 0, got {ssim_weight}: e.g. --model.ssim_weight 1.0")
        if not focal_gamma >= 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}: e.g. --model.focal_gamma 2.0")
        if focal_alpha is not None and (
            len(focal_alpha) != 2 or min(focal_alpha) < 0 or max(focal_alpha) <= 0
        ):
            raise ValueError(
                f"focal_alpha must be null or [normal, anomalous] weights >= 0, not both 0, got {focal_alpha!r}: "
                "e.g. --model.focal_alpha [1.0,1.0]"
            )
        odd = isinstance(smoothing, int) and not isinstance(smoothing, bool) and smoothing % 2 == 1
        if not (odd and smoothing >= 1):
            raise ValueError(
                f"smoothing must be an odd integer >= 1 (mean filter side), got {smoothing!r}: "
                "e.g. --model.smoothing 21"
            )
        self.anomaly_source = anomaly_source or None
        self.p_anomaly, self.opacity = float(p_anomaly), (float(opacity[0]), float(opacity[1]))
        self.grey_textures, self.brightness = grey_textures, float(brightness)
        self.ssim_weight, self.focal_gamma = ssim_weight, focal_gamma
        self.focal_alpha = None if focal_alpha is None else (float(focal_alpha[0]), float(focal_alpha[1]))
        self.smoothing, self.precise_bn, self.seed = smoothing, precise_bn, seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.reconstructive = ReconstructiveNet(3, reconstructive_width)
            self.discriminative = DiscriminativeNet(6, 2, discriminative_width)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))
        self._anomalies: PerlinAnomaly | None = None
        self._sources: dict[str, Any] = {}
        self.loss_terms: dict[str, Tensor] = {}

    # ---- synthetic anomalies -----------------------------------------------------------------
    def anomalies(self) -> PerlinAnomaly:
        """The anomaly generator, built on first use (a bad ``anomaly_source`` raises SourceError here)."""
        if self._anomalies is None:
            self._anomalies = PerlinAnomaly(
                self.anomaly_source, opacity=self.opacity, p_anomaly=self.p_anomaly
            )
            self._sources = {"anomalies": self._anomalies.provenance()}
        return self._anomalies

    def anomaly_seeds(self, batch: dict[str, Any]) -> list[int]:
        """One generator seed per image of ``batch``.

        Training batches carry ``anomaly_step`` (the optimizer step, and ``anomaly_rank``): a fresh draw per
        step and image. Other batches (validation loss, reference passes) are seeded by each image's place in
        its dataset (``seeding.path_key``), so every epoch scores the same anomalies.
        """
        return batch_seeds(batch, ("draem", self.seed), ("draem-eval", self.seed))

    def relight(self, batch: dict[str, Any]) -> Tensor:
        """The batch's images [B,3,H,W], each scaled by its own factor in [1 - brightness, 1 + brightness].

        Factors are drawn from generators seeded apart from the anomalies' (``sources.augment.relight`` with
        keys of their own), so switching ``brightness`` on changes no anomaly; with ``brightness`` 0 the
        images pass through unchanged.
        """
        return relight(batch, self.brightness, ("draem-light", self.seed), ("draem-light-eval", self.seed))

    def synthesize(self, images: Tensor, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] in [0,1] -> corrupted images [B,3,H,W] and their anomaly masks [B,1,H,W] in {0,1}."""
        if len(seeds) != len(images):
            raise ValueError(f"need one seed per image, got {len(seeds)} for {len(images)} images")
        anomalies = self.anomalies()
        corrupted, masks = [], []
        for image, seed in zip(images.detach(), seeds, strict=True):
            generator = torch.Generator().manual_seed(int(seed))
            grey = self.grey_textures and bool((image == image[:1]).all())
            out = anomalies(image[:1] if grey else image, generator)
            corrupted.append(out.image.expand_as(image) if grey else out.image)
            masks.append(out.mask)
        return torch.stack(corrupted), torch.stack(masks)

    # ---- training ----------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> Tensor:
        """L2 + ssim_weight (1 - SSIM) of the reconstruction of corrupted images + focal loss of the mask."""
        images = self.relight(batch)
        corrupted, masks = self.synthesize(images, self.anomaly_seeds(batch))
        recon = self.reconstructive(corrupted)
        logits = self.discriminative(torch.cat([corrupted, recon], dim=1))
        l2 = F.mse_loss(recon.float(), images.float())
        ssim_term = 1.0 - ssim(recon, images).mean()
        focal = focal_loss(logits, masks[:, 0].long(), self.focal_gamma, self.focal_alpha)
        self.loss_terms = {"l2": l2.detach(), "ssim": ssim_term.detach(), "focal": focal.detach()}
        return l2 + self.ssim_weight * ssim_term + focal

    @torch.no_grad()
    def fit_reference(self, batches: Iterable[dict[str, Any]]) -> None:
        """With ``precise_bn``: BatchNorm statistics = averages over one pass of the training images.

        The images are corrupted as for the validation loss (one fixed anomaly per image path), so the
        statistics describe the inputs the networks were trained on.
        """
        if not self.precise_bn:
            return

        def forward(batch: dict[str, Any]) -> int:
            corrupted, _ = self.synthesize(self.relight(batch), self.anomaly_seeds(batch))
            self.discriminative(torch.cat([corrupted, self.reconstructive(corrupted)], dim=1))
            return len(corrupted)

        recompute_batchnorm(self, batches, forward, "DRAEM")

    def check_datamodule(self, datamodule: Any) -> None:
        """Before fitting: every image (or tile) side is at least MIN_SIZE px."""
        for (h, w), flag in input_sizes(datamodule):
            if min(h, w) < MIN_SIZE:
                raise ValueError(
                    f"DRAEM needs images of at least {MIN_SIZE} x {MIN_SIZE} px (its U-Net halves them five "
                    f"times), got {h}x{w}: raise {flag}"
                )

    def check_fitted(self) -> None:
        """Raise RuntimeError unless the networks were trained."""
        if int(self.trained_steps) == 0:
            raise RuntimeError("DRAEM has not been trained: fit it (adx fit) or load a checkpoint")

    # ---- inference ---------------------------------------------------------------------------
    def reconstruct(self, images: Tensor) -> Tensor:
        """Images [B,3,H,W] -> the reconstructive network's anomaly-free version [B,3,H,W]."""
        return self.reconstructive(images)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] in [0,1] -> image scores [B] and anomaly maps [B,H,W], both in [0,1].

        The map is the discriminative network's softmax probability of the anomaly class; the score is the
        maximum of that map after a ``smoothing`` x ``smoothing`` mean filter (zero padding, as a plain
        average pool).
        """
        logits = self.discriminative(torch.cat([images, self.reconstructive(images)], dim=1))
        prob = torch.softmax(logits, dim=1)[:, 1:]
        pad = self.smoothing // 2
        smooth = F.avg_pool2d(prob, self.smoothing, stride=1, padding=pad)
        return smooth.flatten(1).amax(dim=1), prob[:, 0]
