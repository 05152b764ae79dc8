"""Structural similarity (Wang et al. 2004) as plain torch ops: per-pixel maps, traceable and exportable.

Local statistics come from a separable window (Gaussian with ``sigma``, or uniform with ``sigma=None``)
over a reflect-padded image, so the map has the input's size. Bergmann et al. (VISAPP 2019) use an
11 x 11 window; the Gaussian with sigma 1.5 and k1, k2 = 0.01, 0.03 are Wang et al.'s values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ssim_window(size: int = 11, sigma: float | None = 1.5) -> Tensor:
    """1-D float64 window [size] summing to 1: Gaussian with ``sigma``, or uniform when ``sigma`` is None."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"the SSIM window must be an odd size >= 1, got {size}: use e.g. 11")
    if sigma is None:
        return torch.full((size,), 1.0 / size, dtype=torch.float64)
    if not sigma > 0:
        raise ValueError(f"the SSIM window sigma must be > 0 (or None for a uniform window), got {sigma}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _local_mean(x: Tensor, window: Tensor) -> Tensor:
    """Window-weighted mean of every channel of x [B,C,H,W] (already reflect-padded) -> [B,C,H',W']."""
    c, k = x.shape[1], window.numel()
    w = window.to(x)
    x = F.conv2d(x, w.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, w.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim_map(
    x: Tensor,
    y: Tensor,
    window: int = 11,
    sigma: float | None = 1.5,
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Per-pixel, per-channel SSIM of x and y [B,C,H,W] -> [B,C,H,W] in [-1, 1] (1 where identical).

    Border pixels use a reflect-padded neighbourhood; H and W must exceed ``window // 2``. Under autocast
    (mixed precision) it computes in float32: the local variances cancel too much in 16 bits.
    """
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return ssim_map(x.float(), y.float(), window, sigma, data_range, k1, k2)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"ssim_map needs two [B,C,H,W] tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    pad = window // 2
    if min(x.shape[-2:]) <= pad:
        raise ValueError(
            f"images of {x.shape[-2]}x{x.shape[-1]} px are too small for an SSIM window of {window}: "
            f"need more than {pad} px per side"
        )
    w = ssim_window(window, sigma)
    c = x.shape[1]
    # (co)variances as E[ab] - E[a]E[b] cancel badly in float32 where the window is flat; centring each
    # image channel on its own mean first leaves them unchanged and shrinks the terms that cancel
    shift_x, shift_y = x.mean(dim=(2, 3), keepdim=True), y.mean(dim=(2, 3), keepdim=True)
    x, y = x - shift_x, y - shift_y
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    stacked = F.pad(stacked, (pad, pad, pad, pad), mode="reflect")
    mu_x, mu_y, xx, yy, xy = torch.split(_local_mean(stacked, w), c, dim=1)
    var_x, var_y = xx - mu_x * mu_x, yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    mu_x, mu_y = mu_x + shift_x, mu_y + shift_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return num / den


def ssim(x: Tensor, y: Tensor, **kwargs: float | int | None) -> Tensor:
    """Mean SSIM per image of x and y [B,C,H,W] -> [B] (arguments as :func:`ssim_map`)."""
    return ssim_map(x, y, **kwargs).flatten(1).mean(1)  # type: ignore[arg-type]
