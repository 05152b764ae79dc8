"""Colour transforms for anomaly textures, after DRAEM's choice of three random image augmentations."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adx.models.components.seeding import batch_seeds
from adx.models.components.sources.noise import randint, uniform

Generator = torch.Generator | None
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_LUMA = _YIQ[0].view(3, 1, 1)


def gamma(x: Tensor, g: Generator) -> Tensor:
    """x ** gamma, gamma in [0.5, 2]."""
    return x.clamp(min=1e-6) ** math.exp(uniform(-math.log(2.0), math.log(2.0), g))


def brightness(x: Tensor, g: Generator) -> Tensor:
    """x * a + b, a in [0.8, 1.2], b in [-0.12, 0.12]."""
    return x * uniform(0.8, 1.2, g) + uniform(-0.12, 0.12, g)


def sharpness(x: Tensor, g: Generator) -> Tensor:
    """Unsharp mask of strength in [0.5, 2]."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).div_(16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x[None], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)[0]
    return x + uniform(0.5, 2.0, g) * (x - blurred)


def hue_saturation(x: Tensor, g: Generator) -> Tensor:
    """Rotate the chroma (YIQ) by up to 50 degrees and scale the saturation by [0.5, 1.5]."""
    angle, sat = math.radians(uniform(-50.0, 50.0, g)), uniform(0.5, 1.5, g)
    c, s = math.cos(angle) * sat, math.sin(angle) * sat
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    matrix = torch.linalg.inv(_YIQ) @ rotate @ _YIQ
    return torch.einsum("ij,jhw->ihw", matrix, x)


def solarize(x: Tensor, g: Generator) -> Tensor:
    """Invert values above a threshold in [0.125, 0.5]."""
    threshold = uniform(0.125, 0.5, g)
    return torch.where(x >= threshold, 1.0 - x, x)


def posterize(x: Tensor, g: Generator) -> Tensor:
    """Keep 2 to 5 bits per channel."""
    levels = 2 ** randint(2, 6, g)
    return (x * levels).floor().clamp(max=levels - 1) / (levels - 1)


def invert(x: Tensor, g: Generator) -> Tensor:
    """1 - x."""
    return 1.0 - x


def autocontrast(x: Tensor, g: Generator) -> Tensor:
    """Stretch each channel to [0, 1]."""
    low, high = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    return (x - low) / (high - low).clamp(min=1e-3)


def equalize(x: Tensor, g: Generator) -> Tensor:
    """Histogram-equalise each channel (256 bins)."""
    q = (x.clamp(0.0, 1.0) * 255).round().long()
    flat = q.flatten(1) + 256 * torch.arange(x.shape[0]).view(-1, 1)
    hist = torch.bincount(flat.flatten(), minlength=256 * x.shape[0]).view(x.shape[0], 256).float()
    cdf = hist.cumsum(1)
    cdf = (cdf - cdf[:, :1]) / (cdf[:, -1:] - cdf[:, :1]).clamp(min=1.0)
    return cdf.gather(1, q.flatten(1)).view_as(x)


TRANSFORMS = (
    gamma,
    brightness,
    sharpness,
    hue_saturation,
    solarize,
    posterize,
    invert,
    autocontrast,
    equalize,
)


def texture_augment(x: Tensor, generator: Generator = None, n: int = 3) -> Tensor:
    """Apply ``n`` distinct transforms of TRANSFORMS, in random order, to x [3, H, W] in [0, 1]."""
    for i in torch.randperm(len(TRANSFORMS), generator=generator)[:n].tolist():
        x = TRANSFORMS[i](x, generator).clamp(0.0, 1.0)
    return x


def relight(batch: dict[str, Any], strength: float, train_key: tuple, eval_key: tuple) -> Tensor:
    """The batch's images [B,C,H,W] in [0,1], each scaled by its own factor in [1 - strength, 1 + strength].

    A global change of lighting that a model should learn as normal (a line's training and inspection days
    differ). The factors are drawn from per-image generators seeded by ``batch_seeds(batch, train_key,
    eval_key)``: a fresh draw per training step, a fixed one per image path otherwise; give keys of their own
    so the draws do not repeat another generator's. ``strength`` 0 returns the images unchanged.
    """
    images = batch["image"]
    if strength == 0.0:
        return images
    factors = [
        uniform(1.0 - strength, 1.0 + strength, torch.Generator().manual_seed(seed))
        for seed in batch_seeds(batch, train_key, eval_key)
    ]
    scale = torch.tensor(factors, dtype=images.dtype, device=images.device).view(-1, 1, 1, 1)
    return (images * scale).clamp(0.0, 1.0)
