"""DSR's two kinds of synthetic anomalies, both drawn from per-image seeded generators.

- **Quantised feature space** (main stage): a Perlin mask is drawn at image resolution (the core's
  ``perlin_mask``, DRAEM's parameters), max-pooled to a feature map's resolution, and at every masked
  position the codebook vector is replaced by another one: one drawn uniformly among the vectors ranked
  ``skip`` ... ``k`` by distance to the unquantised feature, k = strength x K + 1 with strength drawn from
  [anomaly_strength, 1] (authors' code: skip = 5 % of K, lower strength 0.2). Near vectors give subtle,
  near-in-distribution anomalies, far ones obvious ones; no texture source is needed.
- **Image space** (upsampling stage): a Perlin mask filled with a random solid colour, blended with an
  opacity from ``opacity`` (the authors' "smudges": 1 - beta, beta in [0, 0.8)), or, as an option, the
  core's :class:`~adx.models.components.sources.PerlinAnomaly` textures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adx.models.components.sources import PerlinAnomaly, perlin_mask
from adx.models.components.sources.noise import uniform

PERLIN = {"scale": (0, 6), "threshold": 0.5, "rotate": (-90.0, 90.0)}
"""Perlin mask parameters (DRAEM's and the DSR authors'): 1-32 periods per axis, rotated, thresholded."""


def draw_mask(h: int, w: int, generator: torch.Generator, tries: int = 10) -> Tensor:
    """A non-empty Perlin mask [1,h,w] in {0,1} (redrawn up to ``tries`` times; may stay empty)."""
    for _ in range(tries):
        mask = perlin_mask(h, w, generator, PERLIN["scale"], PERLIN["threshold"], PERLIN["rotate"])
        if mask.any():
            break
    return mask


def pool_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Image-resolution masks [B,1,H,W] -> [B,1,h,w]: a cell is anomalous when any of its pixels is."""
    return F.adaptive_max_pool2d(mask, tuple(size))


def skip_count(codebook_size: int) -> int:
    """How many nearest vectors a replacement never takes: 5 % of K (at least 1, so it always changes)."""
    return max(1, int(0.05 * codebook_size))


def replace_codes(
    z: Tensor,
    q: Tensor,
    vectors: Tensor,
    mask: Tensor,
    strengths: Sequence[float],
    generators: Sequence[torch.Generator],
) -> Tensor:
    """Quantised maps q [B,D,h,w] with the vectors at ``mask`` [B,1,h,w] replaced by other codebook rows.

    For image b at each masked position: rank the K rows of ``vectors`` [K,D] by distance to the
    unquantised feature z[b] and take one of ranks skip ... k-1 uniformly (k = strengths[b] x K + 1, at
    least skip + 1, at most K), drawn from ``generators[b]``. Unmasked positions keep q exactly.
    """
    out = q.clone()
    k_all, d = vectors.shape
    skip = skip_count(k_all)
    sq = (vectors * vectors).sum(1)
    for b in range(len(q)):
        where = mask[b, 0] > 0
        if not bool(where.any()):
            continue
        k = min(k_all, max(skip + 1, int(float(strengths[b]) * k_all) + 1))
        feats = z[b].permute(1, 2, 0)[where].float()  # [N,D] masked positions only
        dist = sq[None, :] - 2.0 * feats @ vectors.T.float()
        ranked = dist.topk(k, dim=1, largest=False).indices  # [N,k], nearest first
        pick = torch.randint(skip, k, (len(feats),), generator=generators[b]).to(ranked.device)
        chosen = ranked.gather(1, pick[:, None])[:, 0]
        new = out[b].permute(1, 2, 0)  # a view: writing it writes out[b]
        new[where] = vectors[chosen].to(out.dtype)
    return out


class ColourSmudge:
    """Perlin mask filled with one random solid colour at a random opacity (the authors' upsampling-stage anomaly)."""

    def __init__(self, opacity: tuple[float, float] = (0.2, 1.0), p_anomaly: float = 0.5) -> None:
        self.opacity = (float(opacity[0]), float(opacity[1]))
        self.p_anomaly = float(p_anomaly)

    def __call__(self, image: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """image [3,H,W] in [0,1] -> (corrupted image, mask [1,H,W]); unchanged with an empty mask at 1 - p."""
        h, w = image.shape[-2:]
        if float(torch.rand((), generator=generator)) >= self.p_anomaly:
            return image.clone(), image.new_zeros(1, h, w)
        mask = draw_mask(h, w, generator).to(image)
        colour = torch.rand(3, 1, 1, generator=generator).to(image)
        alpha = uniform(self.opacity[0], self.opacity[1], generator)
        return image + (alpha * mask) * (colour - image), mask

    def provenance(self) -> dict[str, Any]:
        """Settings, JSON-ready (no external images are used)."""
        return {
            "method": "perlin-colour",
            "opacity": list(self.opacity),
            "p_anomaly": self.p_anomaly,
            "perlin_scale": list(PERLIN["scale"]),
            "threshold": PERLIN["threshold"],
            "rotate": list(PERLIN["rotate"]),
        }


class TextureSmudge:
    """The core's texture anomalies (DRAEM's) for the upsampling stage: an option, not the authors' choice."""

    def __init__(
        self, folder: str | None, opacity: tuple[float, float] = (0.2, 1.0), p_anomaly: float = 0.5
    ) -> None:
        self.source = PerlinAnomaly(folder, opacity=opacity, p_anomaly=p_anomaly)

    def __call__(self, image: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        out = self.source(image, generator)
        return out.image, out.mask

    def provenance(self) -> dict[str, Any]:
        return self.source.provenance()
