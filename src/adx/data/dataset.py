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
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from adx.data.samples import AdxDataError, AdxDataWarning, Sample, swaps_axes, upright_transpose

BitDepth = Union[Literal["auto"], int]
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_FLOAT_TOLERANCE = 1e-3
_low_bits_warned = False  # the 12-bit-in-16 warning is shown once per process


def to_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise ``image_size`` (int = square, or (H, W)) to a (H, W) tuple of positive ints."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        raise AdxDataError(
            f"image_size must be a positive int or [H, W] of positive ints, got {image_size!r}. Fix --data.image_size."
        )
    return int(hw[0]), int(hw[1])


def check_bit_depth(bit_depth: BitDepth) -> BitDepth:
    """Return ``bit_depth`` if it is "auto" or an int in 8..16, else raise AdxDataError."""
    if bit_depth == "auto" or (
        isinstance(bit_depth, int) and not isinstance(bit_depth, bool) and 8 <= bit_depth <= 16
    ):
        return bit_depth
    raise AdxDataError(
        f"bit_depth must be 'auto' or the significant bits of 16-bit images (8..16, e.g. 12 for a 12-bit "
        f"camera), got {bit_depth!r}. Fix --data.bit_depth."
    )


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


def _sixteen_bit(arr: np.ndarray, path: str, mode: str, bit_depth: BitDepth) -> float:
    """Check a 16-bit-container array against ``bit_depth``; return the value that maps to 1.0."""
    low, peak = int(arr.min(initial=0)), int(arr.max(initial=0))
    if mode == "I" and (low < 0 or peak > 65535):
        raise AdxDataError(
            f"image '{path}' holds 32-bit integers in [{low}, {peak}], outside 0..65535; adx reads integer images "
            "with at most 16 bits. Save it as 16-bit PNG/TIFF, or as a float TIFF scaled to [0, 1]."
        )
    if bit_depth == "auto":
        if 0 < peak <= 4095:
            _warn_low_bits(path, peak)
        return 65535.0
    top = 2**bit_depth - 1
    if peak > top:
        raise AdxDataError(
            f"image '{path}' has a value of {peak}, above {top}, the largest value of --data.bit_depth {bit_depth}. "
            "Set --data.bit_depth to the bits your camera writes (16 or auto for the full 16-bit range)."
        )
    return float(top)


def _warn_low_bits(path: str, peak: int) -> None:
    """Warn (once per process) that a 16-bit image only uses the low bits, naming the file and the option."""
    global _low_bits_warned
    if _low_bits_warned:
        return
    _low_bits_warned = True
    bits = next(b for b in (8, 10, 12) if peak < 2**b)
    warnings.warn(
        f"image '{path}' is 16-bit but its largest value is {peak} (fits in {bits} bits): with --data.bit_depth "
        f"auto it is scaled by 65535 and comes out nearly black. If your camera writes {bits}-bit data, pass "
        f"--data.bit_depth {bits}; if it is genuinely dark 16-bit data, pass --data.bit_depth 16 (shown once).",
        AdxDataWarning,
        stacklevel=4,
    )


def _decode(img: Image.Image, path: str, bit_depth: BitDepth) -> tuple[np.ndarray, float]:
    """Pixels of an upright image as (H, W) or (H, W, 3) in the file's units, and the value that maps to 1.0."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.array(img)
        return arr, _sixteen_bit(arr, path, mode, bit_depth)
    if mode == "F":
        arr = np.array(img, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise AdxDataError(
                f"float image '{path}' contains NaN or infinite values. Replace them (e.g. by 0) when writing it."
            )
        low, high = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if low < -_FLOAT_TOLERANCE or high > 1.0 + _FLOAT_TOLERANCE:
            raise AdxDataError(
                f"float image '{path}' has values in [{low:g}, {high:g}]; adx reads float images as intensities in "
                "[0, 1]. Rescale when you write it (e.g. divide 8-bit-range data by 255), or save it as 8/16-bit."
            )
        return arr, 1.0
    return np.array(_as_l_or_rgb(img)), 255.0  # a writable copy, as torch.from_numpy wants


def _as_l_or_rgb(img: Image.Image) -> Image.Image:
    """8-bit image -> L (1-bit, LA) or RGB (palette colours, RGBA, CMYK, YCbCr...); alpha is dropped."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("1", "LA", "La"):
        return img.convert("L")
    return img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB").convert("RGB")


def _load(
    path: str, size: tuple[int, int] | None, bit_depth: BitDepth, fast_jpeg: bool = False
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image file -> float32 [3, H, W] in [0, 1] resized to ``size`` if given, and the file's upright (H, W)."""
    try:
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
    except AdxDataError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise AdxDataError(
            f"failed to decode image '{path}' ({type(exc).__name__}: {exc}). Replace or delete this file."
        ) from exc


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
