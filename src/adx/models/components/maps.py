"""Shared anomaly-map helpers: patch features, upsampling and Gaussian smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import Tensor, nn


def gaussian_smooth(maps: Tensor, sigma: float) -> Tensor:
    """Blur maps [B,H,W] with a Gaussian of ``sigma`` pixels (kernel 2*round(4 sigma)+1); 0 disables."""
    if sigma <= 0:
        return maps
    k = 2 * int(4.0 * sigma + 0.5) + 1
    return gaussian_blur2d(maps.unsqueeze(1), (k, k), (sigma, sigma)).squeeze(1)


def to_image_size(maps: Tensor, size: tuple[int, int], sigma: float = 4.0) -> Tensor:
    """Patch maps [B,h,w] -> bilinear upsampled to ``size`` [B,H,W], then Gaussian smoothed."""
    up = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return gaussian_smooth(up, sigma)


def upsample_and_combine(maps: list[Tensor], size: tuple[int, int], multiply: bool) -> Tensor:
    """Per-scale maps [B,h_i,w_i] -> each upsampled (bilinear) to ``size``, then multiplied or summed [B,H,W]
    (the student-teacher methods' way of making one anomaly map from several feature scales)."""
    out: Tensor | None = None
    for m in maps:
        up = F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
        out = up if out is None else (out * up if multiply else out + up)
    if out is None:
        raise ValueError("upsample_and_combine needs at least one map")
    return out


def align_and_concat(features: list[Tensor]) -> Tensor:
    """Feature maps at several strides -> upsampled to the first (finest) map and concatenated [B,C,h,w]."""
    size = features[0].shape[-2:]
    aligned = [
        f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        for f in features
    ]
    return torch.cat(aligned, dim=1)


class DynamicBuffers(nn.Module):
    """Mixin: buffers named in ``dynamic_buffers`` take the shape stored in a loaded state dict.

    Those also named in ``optional_buffers`` may be absent from it (checkpoints written before the
    buffer existed) and then keep their current value.
    """

    dynamic_buffers: tuple[str, ...] = ()
    optional_buffers: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        for name in self.optional_buffers:
            state_dict.setdefault(prefix + name, getattr(self, name))
        for name in self.dynamic_buffers:
            if prefix + name in state_dict:
                stored = state_dict[prefix + name]
                setattr(
                    self,
                    name,
                    torch.empty(stored.shape, dtype=stored.dtype, device=getattr(self, name).device),
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
