"""Torch dataset over Samples: RGB image in [0, 1] and aligned binary mask, both resized to ``image_size``.

How files become pixels (docs/data.md has the same rules with examples):

- Orientation: an EXIF orientation tag (JPEG, WebP, PNG eXIf before the pixel data; TIFF orientation is applied
  by PIL itself) is applied first, as PIL.ImageOps.exif_transpose would, so images and their masks are used
  upright; sizes, mask checks and ``orig_size`` are in the upright frame.
- Values, one fixed scale per storage type, never per image (so contrast between images is kept):
  8-bit (L, RGB, palette, 1-bit, RGBA/LA with alpha dropped, CMYK...) -> value / 255; palette images use
  their palette colours. 16-bit integers (I;16 PNG/TIFF, and mode I holding 0..65535) -> value / (2**bit_depth - 1),
  with ``bit_depth`` "auto" = 16. A 16-bit image whose largest value is <= 4095 under "auto" triggers one
  AdxDataWarning naming the file (12-bit camera data would come out nearly black: pass ``--data.bit_depth 12``);
  with an explicit bit_depth, a value above 2**bit_depth - 1 is an AdxDataError. Float images (mode F) are
  intensities in [0, 1]: values within 1e-3 of the range are clipped, anything else (or NaN/inf) is an AdxDataError.
- Resizing: every image, whatever its size, mode or format, is decoded at full size and resized by
  ``resize_pixels`` (antialiased bilinear, half-pixel centres): 8-bit images in 8-bit arithmetic (within 1 grey
  level of float), 16-bit and float images in float32. ``fast_jpeg`` (off by default) decodes JPEGs at the
  smallest DCT scale >= 2x the target first (``Image.draft``): 1.5-4x faster for 2-5 MP JPEGs, mean deviation
  under 0.5 grey level, but its ringing moved sharp edges of a real photo by up to 35 grey levels, by amounts
  that depend on the image size; use it only for large JPEGs that all have one size.
- Masks: any non-zero pixel is a defect (label maps 0/1/2/3 included; colour masks: any non-zero colour
  channel; alpha ignored). JPEG masks are lossy, so they are defect where >= 128 (half the 8-bit range).

Every decode problem raises AdxDataError naming the file and what to do.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from adx.data.samples import Sample
from adx.imageio import (  # noqa: F401  (re-exported: the data path decodes as deploy does)
    AdxDataError,
    AdxDataWarning,
    BitDepth,
    _as_l_or_rgb,
    _decode,
    check_bit_depth,
    naming_the_file,
    swaps_axes,
    upright_transpose,
)


def to_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise ``image_size`` (int = square, or (H, W)) to a (H, W) tuple of positive ints."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        raise AdxDataError(
            f"image_size must be a positive int or [H, W] of positive ints, got {image_size!r}. Fix --data.image_size."
        )
    return int(hw[0]), int(hw[1])


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] uint8 or float32 -> [C, size[0], size[1]] same dtype; antialiased bilinear, half-pixel centres.

    The one resize of every image. uint8 input (8-bit files) runs torch's fixed-point kernel: within 1 grey
    level of the float result and about 20x faster on a 1600x1200 RGB image than the float kernel.
    """
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    try:
        return F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    except (RuntimeError, NotImplementedError):  # a torch without the uint8 kernel: same filter in float
        if pixels.dtype != torch.uint8:
            raise
        resized = resize_pixels(pixels.float(), size)
        return resized.round_().clamp_(0, 255).to(torch.uint8)


def _load(
    path: str, size: tuple[int, int] | None, bit_depth: BitDepth, fast_jpeg: bool = False
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image file -> float32 [3, H, W] in [0, 1] resized to ``size`` if given, and the file's upright (H, W)."""
    with naming_the_file(path):
        with Image.open(path) as img:
            method = upright_transpose(img)
            w, h = img.size
            if swaps_axes(method):
                w, h = h, w
            if fast_jpeg and size is not None:  # JPEG only, others ignore it: smallest DCT scale >= 2x target
                want = (2 * size[1], 2 * size[0])
                img.draft(img.mode, want[::-1] if swaps_axes(method) else want)
            arr, top = _decode(img if method is None else img.transpose(method), path, bit_depth)
        pixels = torch.from_numpy(arr if arr.dtype == np.uint8 else arr.astype(np.float32))
        pixels = pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels[None]
        orig = (h, w)
        if size is not None:
            pixels = resize_pixels(pixels, size)
        pixels = pixels.float().div_(top).clamp_(0.0, 1.0)
        return (pixels.repeat(3, 1, 1) if pixels.shape[0] == 1 else pixels.contiguous()), orig


def load_image(
    path: str, size: tuple[int, int] | None = None, bit_depth: BitDepth = "auto", fast_jpeg: bool = False
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``path`` to float32 (H, W, 3) in [0, 1], resized to ``size`` (H, W) if given (module docstring rules).

    Returns the array and the file's original upright (H, W). Raises AdxDataError naming the path on failure.
    """
    pixels, orig = _load(path, size, bit_depth, fast_jpeg)
    return np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()), orig


def _to_rgb_array(img: Image.Image, bit_depth: BitDepth = "auto", path: str = "<image>") -> np.ndarray:
    """An opened PIL image (as stored, no orientation) at full size -> float32 (H, W, 3) in [0, 1]; the reference."""
    arr, top = _decode(img, path, bit_depth)
    arr = np.clip(arr.astype(np.float32) / np.float32(top), 0.0, 1.0)
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


def _resize_array(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 (H, W, C) -> (size[0], size[1], C) through ``resize_pixels``."""
    pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    return resize_pixels(pixels, size).clamp(0.0, 1.0).permute(1, 2, 0).numpy()


def _binary_mask(img: Image.Image, path: str, lossy: bool) -> np.ndarray:
    """Mask as bool (H, W): any non-zero value (any non-zero colour channel) is a defect; lossy (JPEG): >= 128."""
    if not (img.mode in ("1", "L", "F") or img.mode.startswith("I")):
        img = _as_l_or_rgb(img)  # palette masks by their colours, alpha ignored
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if not lossy:
        return arr != 0
    peak = int(arr.max(initial=0))
    if 0 < peak < 128:
        warnings.warn(
            f"JPEG mask '{path}' has no value >= 128 (largest {peak}), so it marks no defect: JPEG masks are read as "
            "defect where >= 128 because compression noise makes small values unreliable. Save masks as PNG.",
            AdxDataWarning,
            stacklevel=3,
        )
    return arr >= 128


def load_mask(path: str) -> np.ndarray:
    """Decode a mask file to bool (H, W), upright per its EXIF orientation; raise AdxDataError naming the path."""
    try:
        with Image.open(path) as img:
            lossy = img.format in ("JPEG", "MPO")
            method = upright_transpose(img)
            return _binary_mask(img if method is None else img.transpose(method), path, lossy)
    except Exception as exc:
        raise AdxDataError(
            f"failed to decode mask '{path}' ({type(exc).__name__}: {exc}). Replace this file."
        ) from exc


class AnomalyDataset(Dataset):
    """Dataset of Samples returning dicts: image [3,H,W] in [0,1], mask [1,H,W] 0/1, label, path and metadata."""

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int | tuple[int, int],
        bit_depth: BitDepth = "auto",
        fast_jpeg: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.image_size = to_hw(image_size)
        self.bit_depth = check_bit_depth(bit_depth)
        self.fast_jpeg = fast_jpeg

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image, (h, w) = _load(sample.image_path, self.image_size, self.bit_depth, self.fast_jpeg)
        if sample.mask_path is not None:
            mask_array = load_mask(sample.mask_path)
            if mask_array.shape != (h, w):
                raise AdxDataError(
                    f"mask '{sample.mask_path}' is {mask_array.shape[1]}x{mask_array.shape[0]} (WxH) but image "
                    f"'{sample.image_path}' is {w}x{h} (upright, after EXIF orientation). Re-export the mask at "
                    "the image resolution, in the upright frame."
                )
            mask = torch.from_numpy(mask_array.astype(np.float32))[None, None]
            if (h, w) != self.image_size:
                mask = F.interpolate(mask, size=self.image_size, mode="nearest-exact")
            mask = mask[0]
        else:
            mask = torch.zeros(1, *self.image_size)
        return {
            "image": image,
            "mask": mask,
            "label": int(sample.label),
            "path": sample.image_path,
            "defect_type": sample.defect_type,
            "orig_size": torch.tensor([h, w], dtype=torch.long),
            "has_mask": sample.mask_path is not None,
        }
