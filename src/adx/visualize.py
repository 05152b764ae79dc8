"""Dependency-light visualisation: colour maps, overlays, contours and side-by-side panels as uint8 arrays.

Pure NumPy/SciPy/Pillow functions (no Lightning, no matplotlib, no fonts). Images are ``uint8[H,W,3]`` RGB,
heat maps ``float[H,W]`` in ``[0, 1]`` and masks ``bool[H,W]`` (``[1,H,W]``/``[H,W,1]`` planes are accepted).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

__all__ = [
    "colormap",
    "draw_contour",
    "mask_edges",
    "overlay",
    "panel",
    "save_image",
    "to_uint8_image",
]

#: Piecewise-linear jet-like colour table: (position, R, G, B). Red is non-decreasing along the scale.
_COLOR_TABLE = np.array(
    [
        [0.00, 0, 0, 128],  # dark blue
        [0.15, 0, 0, 255],  # blue
        [0.40, 0, 255, 255],  # cyan
        [0.65, 255, 255, 0],  # yellow
        [1.00, 255, 0, 0],  # red
    ],
    dtype=np.float64,
)
_CROSS = ndimage.generate_binary_structure(2, 1)
GAP = 4  # white pixels between panel tiles
_WHITE = (255, 255, 255)


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8[H,W] or uint8[H,W,1|3|4] -> uint8[H,W,3] (gray replicated, alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape [H,W] or [H,W,C], got {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[..., :3]


def _plane(name: str, arr: np.ndarray, hw: tuple[int, int], dtype: type | None = None) -> np.ndarray:
    """[H,W], [1,H,W] or [H,W,1] array -> [H,W] (optionally cast); ValueError unless the plane is ``hw``."""
    arr = np.asarray(arr, dtype=dtype)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.shape != hw:
        raise ValueError(f"{name} has shape {arr.shape}, expected {hw}")
    return arr


def colormap(x: np.ndarray) -> np.ndarray:
    """Map float[H,W] values in [0, 1] (clipped; NaN -> 0) to a jet-like uint8[H,W,3] RGB image."""
    v = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0)
    v = np.clip(v, 0.0, 1.0)
    pos = _COLOR_TABLE[:, 0]
    channels = [np.interp(v, pos, _COLOR_TABLE[:, c]) for c in (1, 2, 3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend ``colormap(heat[H,W])`` over image uint8[H,W,3] with weight ``alpha``; returns uint8[H,W,3]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = _rgb(image)
    heat = _plane("heat", heat, rgb.shape[:2])
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colormap(heat).astype(np.float32)
    return np.rint(blended).clip(0, 255).astype(np.uint8)


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """Inner 1-px boundary bool[H,W] of mask bool[H,W]: pixels with a 4-neighbour outside or off-image."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def _contour_band(mask: np.ndarray) -> np.ndarray:
    """2-px contour bool[H,W] straddling the boundary of mask bool[H,W]: inner edge plus outer edge."""
    mask = np.asarray(mask, dtype=bool)
    outer = ndimage.binary_dilation(mask, structure=_CROSS) & ~mask
    return mask_edges(mask) | outer


def draw_contour(image: np.ndarray, mask: np.ndarray, color: Sequence[int] = (0, 255, 0)) -> np.ndarray:
    """Copy of image uint8[H,W,3] with the 2-px contour of mask bool[H,W] painted in ``color``."""
    out = _rgb(image).copy()
    mask = _plane("mask", mask, out.shape[:2], bool)
    out[_contour_band(mask)] = np.asarray(color, dtype=np.uint8)
    return out


def _tint(image: np.ndarray, mask: np.ndarray, color: Sequence[int], alpha: float = 0.4) -> np.ndarray:
    """Copy of image uint8[H,W,3] with mask bool[H,W] pixels blended towards ``color`` by ``alpha``."""
    out = image.copy()
    tinted = (1.0 - alpha) * out[mask].astype(np.float32) + alpha * np.asarray(color, dtype=np.float32)
    out[mask] = np.rint(tinted).clip(0, 255).astype(np.uint8)
    return out


def panel(
    image: np.ndarray,
    heat: np.ndarray,
    pred_mask: np.ndarray | None,
    gt_mask: np.ndarray | None,
    title: str | None = None,
) -> np.ndarray:
    """Side-by-side panel uint8[H, k*W + 4*(k-1), 3] of image uint8[H,W,3], heat float[H,W], masks bool[H,W].

    Tiles: the image with the ground-truth contour in green (if ``gt_mask``), the heat-map overlay, and (if
    ``pred_mask``) the image tinted red inside the predicted mask with a red contour; 4-px white gaps
    between tiles, so ``k`` is 3 with a predicted mask and 2 without. ``title`` is accepted for API
    compatibility but not drawn (no fonts are assumed).
    """
    del title
    rgb = _rgb(image)
    hw = rgb.shape[:2]
    heat = _plane("heat", heat, hw)
    first = rgb.copy()
    if gt_mask is not None:
        first = draw_contour(first, gt_mask, color=(0, 255, 0))
    tiles = [first, overlay(rgb, heat)]
    if pred_mask is not None:
        pred = _plane("pred_mask", pred_mask, hw, bool)
        tiles.append(draw_contour(_tint(rgb, pred, (255, 0, 0)), pred, color=(255, 0, 0)))
    gap = np.full((hw[0], GAP, 3), _WHITE, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, tile in enumerate(tiles):
        if i:
            parts.append(gap)
        parts.append(tile)
    return np.concatenate(parts, axis=1)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def save_image(path: str | Path, array: np.ndarray, overwrite: bool = False, quality: int = 95) -> Path:
    """Write uint8/bool array[H,W] or [H,W,3|4] as PNG or JPEG (by suffix), creating parent dirs.

    Never overwrites unless asked. JPEG (``quality``) encodes about 20x faster than PNG and drops alpha.
    """
    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write {path}: use a .png, .jpg or .jpeg file name")
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise TypeError(f"save_image expects a uint8 (or bool) array, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"save_image expects shape [H,W] or [H,W,3|4], got {arr.shape}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite existing file: {path}")
    buffer = io.BytesIO()  # encode first so a failure never leaves a truncated file behind
    if fmt == "JPEG" and arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    options = {"quality": quality} if fmt == "JPEG" else {}
    Image.fromarray(np.ascontiguousarray(arr)).save(buffer, format=fmt, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb" if overwrite else "xb") as fh:
            fh.write(buffer.getvalue())
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite existing file: {path}") from None
    return path


def to_uint8_image(
    t: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """Tensor[3,H,W] (or [1,H,W]/[H,W]) in [0, 1] -> uint8[H,W,3]; undoes ``(x - mean) / std`` if given."""
    x = t.detach().to(device="cpu", dtype=torch.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected a tensor of shape [C,H,W] or [H,W], got {tuple(x.shape)}")
    if std is not None:
        x = x * torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    if mean is not None:
        x = x + torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    if x.shape[0] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[0]}")
    x = torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
