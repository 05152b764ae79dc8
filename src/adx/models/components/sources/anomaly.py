"""DRAEM-style synthetic anomalies: a Perlin mask filled with a texture, blended into a normal image."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from adx.models.components.sources.images import TextureSource
from adx.models.components.sources.noise import perlin_mask, uniform


class Augmented(NamedTuple):
    """Output of PerlinAnomaly: image [C, H, W] in [0, 1], mask [1, H, W] in {0, 1}, label 0 or 1."""

    image: Tensor
    mask: Tensor
    label: int


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """An int seeds a fresh CPU generator; a generator or None (torch's global RNG) passes through."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


class PerlinAnomaly:
    """Paste a texture through a random Perlin mask into a normal image (Zavrtanik et al., ICCV 2021).

    With probability ``p_anomaly`` the image gets ``image + a * mask * (texture - image)``, the opacity
    a drawn from ``opacity`` (DRAEM's 1 - beta, beta in [0, 0.8]); otherwise it is returned unchanged
    with an empty mask and label 0. Empty masks are redrawn up to ``max_tries`` times; label is 1
    exactly when the returned mask is non-empty. Mask parameters are those of ``perlin_mask``.
    """

    def __init__(
        self,
        source: TextureSource | str | Path | None = None,
        opacity: tuple[float, float] = (0.2, 1.0),
        p_anomaly: float = 0.5,
        perlin_scale: tuple[int, int] = (0, 6),
        threshold: float = 0.5,
        rotate: tuple[float, float] | None = (-90.0, 90.0),
        max_tries: int = 10,
    ) -> None:
        if not 0.0 <= opacity[0] <= opacity[1] <= 1.0:
            raise ValueError(f"opacity must be (low, high) with 0 <= low <= high <= 1, got {opacity!r}")
        if not 0.0 <= p_anomaly <= 1.0:
            raise ValueError(f"p_anomaly must be in [0, 1], got {p_anomaly!r}")
        self.source = source if isinstance(source, TextureSource) else TextureSource(source)
        self.opacity = tuple(opacity)
        self.p_anomaly = float(p_anomaly)
        self.perlin_scale = tuple(perlin_scale)
        self.threshold = float(threshold)
        self.rotate = None if rotate is None else tuple(rotate)
        self.max_tries = max(1, int(max_tries))

    def mask(self, h: int, w: int, generator: torch.Generator | None = None) -> Tensor:
        """A Perlin mask [1, h, w], redrawn up to ``max_tries`` times while empty (may stay empty)."""
        for _ in range(self.max_tries):
            mask = perlin_mask(h, w, generator, self.perlin_scale, self.threshold, self.rotate)
            if mask.any():
                break
        return mask

    def __call__(self, image: Tensor, generator: torch.Generator | int | None = None) -> Augmented:
        """image [C, H, W] in [0, 1] (C = 1 or 3, any device) -> Augmented(image, mask, label)."""
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(
                f"PerlinAnomaly expects one image [C, H, W] with C = 1 or 3, got {tuple(image.shape)}"
            )
        g = as_generator(generator)
        c, h, w = image.shape
        empty = Augmented(image.clone(), image.new_zeros(1, h, w), 0)
        if float(torch.rand((), generator=g)) >= self.p_anomaly:
            return empty
        mask = self.mask(h, w, g)
        if not mask.any():
            return empty
        texture = self.source.sample((h, w), g)
        if c == 1:
            texture = texture.mean(0, keepdim=True)
        opacity = uniform(self.opacity[0], self.opacity[1], g)
        mask = mask.to(image)
        blended = image + (opacity * mask) * (texture.to(image) - image)
        return Augmented(blended.clamp(0.0, 1.0), mask, 1)

    def provenance(self) -> dict[str, Any]:
        """Settings and texture provenance, JSON-ready."""
        return {
            "method": "perlin",
            "opacity": list(self.opacity),
            "p_anomaly": self.p_anomaly,
            "perlin_scale": list(self.perlin_scale),
            "threshold": self.threshold,
            "rotate": None if self.rotate is None else list(self.rotate),
            "textures": self.source.provenance(),
        }

    def describe(self) -> dict[str, Any]:
        """Same as ``provenance()``."""
        return self.provenance()

    def __repr__(self) -> str:
        return f"PerlinAnomaly(source={self.source!r}, opacity={self.opacity}, p_anomaly={self.p_anomaly})"
