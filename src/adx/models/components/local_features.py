"""Locally aware patch features in the PatchCore / SimpleNet authors' form, written to trace and export.

Each feature level's map [B,C,h,w] becomes, per position, its k x k neighbourhood unfolded into one vector of
C*k*k values (zero padded at the border, ordered channel-major as ``F.unfold`` orders them), which adaptive
average pooling brings to ``dim`` values. The coarser levels are then resized (bilinear) to the finest grid,
the levels are concatenated and pooled once more to ``dim``. Pooling over channels and bilinear resizing over
positions are both linear and act on different axes, so pooling before resizing (cheaper) gives the result of
resizing the unfolded vectors first.

``F.adaptive_avg_pool1d`` exports to ONNX only when the output size divides the input size; :class:`ChannelPool`
computes the same windows as fixed gathers and weights, for any sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def neighbourhoods(x: Tensor, size: int) -> Tensor:
    """[B,C,h,w] -> [B,h,w,C*size*size]: each position's zero-padded neighbourhood, ordered (c, dy, dx)."""
    if size == 1:
        return x.permute(0, 2, 3, 1)
    pad = size // 2
    padded = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2], x.shape[-1]
    shifts = [padded[:, :, dy : dy + h, dx : dx + w] for dy in range(size) for dx in range(size)]
    stacked = torch.stack(shifts, dim=-1)  # [B,C,h,w,k*k]
    b, c = x.shape[0], x.shape[1]
    return stacked.permute(0, 2, 3, 1, 4).reshape(b, h, w, c * size * size)


class ChannelPool(nn.Module):
    """Adaptive average pooling of the last axis from ``n_in`` to ``n_out`` values (``F.adaptive_avg_pool1d``'s
    windows: output j averages inputs floor(j n_in / n_out) .. ceil((j+1) n_in / n_out) - 1)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        if n_in < 1 or n_out < 1:
            raise ValueError(f"channel pooling needs positive sizes, got {n_in} -> {n_out}")
        j = torch.arange(n_out)
        start = (j * n_in) // n_out
        end = ((j + 1) * n_in + n_out - 1) // n_out
        width = int((end - start).max())
        offsets = torch.arange(width)
        index = start[:, None] + offsets[None, :]  # [n_out, width]
        valid = index < end[:, None]
        weight = valid.float() / (end - start)[:, None].float()
        self.n_in, self.n_out, self.width = n_in, n_out, width
        self.register_buffer("index", index.clamp_max(n_in - 1).flatten(), persistent=False)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """[..., n_in] -> [..., n_out]."""
        if self.width == 1 and self.n_in == self.n_out:
            return x
        picked = x.index_select(-1, self.index).unflatten(-1, (self.n_out, self.width))
        return (picked * self.weight.to(picked.dtype)).sum(-1)


class LocalFeatures(nn.Module):
    """Feature maps at several strides [B,C_l,h_l,w_l] -> locally aware patch features [B,h_0,w_0,dim]."""

    def __init__(self, channels: Sequence[int], patch_size: int = 3, dim: int = 1536) -> None:
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd number, got {patch_size}")
        self.patch_size, self.dim = int(patch_size), int(dim)
        self.levels = nn.ModuleList(ChannelPool(c * patch_size * patch_size, dim) for c in channels)
        self.aggregate = ChannelPool(len(channels) * dim, dim)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Per-level maps (finest first) -> [B,h_0,w_0,dim]."""
        size = (feats[0].shape[-2], feats[0].shape[-1])
        pooled = []
        for pool, f in zip(self.levels, feats, strict=True):
            p = pool(neighbourhoods(f, self.patch_size))  # [B,h_l,w_l,dim]
            if (f.shape[-2], f.shape[-1]) != size:
                p = p.permute(0, 3, 1, 2)
                p = F.interpolate(p, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
            pooled.append(p)
        return self.aggregate(torch.cat(pooled, dim=-1))
