"""Perlin gradient noise, Perlin anomaly masks and coloured fractal noise in torch, at any (H, W).

All randomness comes from an optional CPU ``torch.Generator`` (None: torch's global RNG), so a seeded
generator reproduces the same output. Noise is evaluated at pixel centres, so H and W need not be
multiples of the lattice resolution (unlike the power-of-two reference implementation of DRAEM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    """One float drawn uniformly from [low, high)."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """One int drawn uniformly from [low, high) (high exclusive, like ``torch.randint``)."""
    return int(torch.randint(low, high, (), generator=generator))


def _fade(t: Tensor) -> Tensor:
    """Perlin's quintic smoothstep 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    h: int,
    w: int,
    res: Sequence[float],
    generator: torch.Generator | None = None,
    angle: float = 0.0,
    channels: int = 1,
) -> Tensor:
    """2D Perlin noise [channels, h, w], scaled by sqrt(2) as in DRAEM: values within about [-1, 1].

    ``res`` = (lattice periods along H, along W), any positive floats; ``angle`` (degrees) rotates the
    pattern about the image centre; the rotated noise fills the whole image (no empty corners).
    """
    if angle:
        return _perlin_rotated(h, w, res, generator, angle, channels)
    (wy, dy), (wx, dx) = _axis_weights(h, res[0]), _axis_weights(w, res[1])
    theta = torch.rand(channels, wy.shape[1], wx.shape[1], generator=generator) * (2 * math.pi)
    # separable form: sum over the 4 corners of (y weight) x (x weight) x (gradient . offset)
    return (dy @ theta.cos() @ wx.T + wy @ theta.sin() @ dx.T).mul_(math.sqrt(2.0))


def _axis_weights(n: int, res: float) -> tuple[Tensor, Tensor]:
    """[n, cells + 1] interpolation weights and weights x offsets of n pixel centres on ``res`` periods."""
    t = (torch.arange(n, dtype=torch.float32) + 0.5) * (float(res) / n)
    cell = t.floor()
    frac = t - cell
    cell = cell.long()
    s = _fade(frac)
    rows = torch.arange(n)
    weights = torch.zeros(n, int(cell.max()) + 2)
    offsets = torch.zeros_like(weights)
    weights[rows, cell], weights[rows, cell + 1] = 1.0 - s, s
    offsets[rows, cell], offsets[rows, cell + 1] = (1.0 - s) * frac, s * (frac - 1.0)
    return weights, offsets


def _perlin_rotated(
    h: int, w: int, res: Sequence[float], generator: torch.Generator | None, angle: float, channels: int
) -> Tensor:
    """Noise on a canvas large enough to hold the rotated image, sampled (bilinear) on rotated pixel centres.

    Costs about a third of evaluating the lattice at every rotated pixel, for the same pattern.
    """
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ch = math.ceil(abs(cos) * h + abs(sin) * w) + 2
    cw = math.ceil(abs(sin) * h + abs(cos) * w) + 2
    canvas = perlin_noise(
        ch, cw, (float(res[0]) * ch / h, float(res[1]) * cw / w), generator, channels=channels
    )
    yy = (torch.arange(h, dtype=torch.float32) + (0.5 - h / 2)).view(h, 1)
    xx = (torch.arange(w, dtype=torch.float32) + (0.5 - w / 2)).view(1, w)
    grid = torch.stack(((sin * yy + cos * xx) * (2 / cw), (cos * yy - sin * xx) * (2 / ch)), dim=-1)
    return F.grid_sample(canvas[None], grid[None], mode="bilinear", align_corners=False)[0]


def perlin_mask(
    h: int,
    w: int,
    generator: torch.Generator | None = None,
    scale: tuple[int, int] = (0, 6),
    threshold: float = 0.5,
    rotate: tuple[float, float] | None = (-90.0, 90.0),
) -> Tensor:
    """Binary Perlin mask [1, h, w] (float 0/1) as in DRAEM; may be empty.

    Periods per axis are ``2**k`` with k drawn independently from [scale[0], scale[1]) for H and W;
    the pattern is rotated by an angle drawn from ``rotate`` (degrees; None: no rotation) and
    thresholded at ``threshold``.
    """
    if not 0 <= scale[0] < scale[1]:
        raise ValueError(f"perlin scale must be exponents 0 <= low < high, got {scale!r}")
    ky, kx = randint(scale[0], scale[1], generator), randint(scale[0], scale[1], generator)
    angle = uniform(rotate[0], rotate[1], generator) if rotate else 0.0
    noise = perlin_noise(h, w, (2**ky, 2**kx), generator, angle=angle)
    return (noise > threshold).float()


def fractal_noise(
    h: int,
    w: int,
    res: Sequence[float],
    generator: torch.Generator | None = None,
    octaves: int = 4,
    persistence: float = 0.5,
    channels: int = 1,
) -> Tensor:
    """Fractal (fBm) Perlin noise [channels, h, w]: octaves at res * 2**i weighted persistence**i."""
    out = torch.zeros(channels, h, w)
    for i in range(octaves):
        out += persistence**i * perlin_noise(
            h, w, (res[0] * 2**i, res[1] * 2**i), generator, channels=channels
        )
    return out


def procedural_image(h: int, w: int, generator: torch.Generator | None = None) -> Tensor:
    """Coloured fractal-noise image [3, h, w] in [0, 1]: the source of last resort, needs no files."""
    res = (2 ** randint(0, 4, generator), 2 ** randint(0, 4, generator))
    octaves = randint(2, 6, generator)
    noise = fractal_noise(
        h, w, res, generator, octaves=octaves, persistence=uniform(0.35, 0.7, generator), channels=3
    )
    if float(torch.rand((), generator=generator)) < 0.3:  # turbulence: vein- and crack-like patterns
        noise = -noise.abs()
    noise = (noise - noise.mean(dim=(1, 2), keepdim=True)) / (noise.std(dim=(1, 2), keepdim=True) + 1e-6)
    mixing = torch.eye(3) * uniform(0.0, 1.0, generator) + torch.rand(3, 3, generator=generator)
    colour = torch.rand(3, 1, 1, generator=generator)
    image = colour + uniform(0.05, 0.25, generator) * torch.einsum("ij,jhw->ihw", mixing, noise)
    low, high = image.amin(), image.amax()
    if float(torch.rand((), generator=generator)) < 0.5:  # half the time stretch to the full range
        image = (image - low) / (high - low + 1e-6)
    return image.clamp_(0.0, 1.0)
