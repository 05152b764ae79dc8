"""Image files -> pixels, with numpy and Pillow only (no torch): the decode rules adx trains and deploys with.

The rules (module docstring of :mod:`adx.data.dataset` and docs/data.md): EXIF orientation applied first, one
fixed value scale per storage type (8-bit / 255, 16-bit / (2**bit_depth - 1), float as [0, 1] intensities),
palette colours, alpha dropped. :func:`read_image` gives float32 (H, W, 3) in [0, 1] at the file's own size;
the training data path resizes the same pixels, and the deploy :class:`adx.deploy.Inferencer` hands them to
the exported graph, which resizes inside. Every problem raises :class:`AdxDataError` naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, Union

import numpy as np
from PIL import Image, PngImagePlugin, TiffImagePlugin


class AdxDataError(ValueError):
    """Bad data input; the message names the offending file/folder/key and says what to do."""


class AdxDataWarning(UserWarning):
    """Data that loads but probably not as the user meant (the message names the file and the option to set)."""


_ORIENTATION_TAG = 0x0112
_UPRIGHT = {  # EXIF orientation -> the transposition that shows the image upright (as PIL.ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright_transpose(img: Image.Image) -> Image.Transpose | None:
    """The transposition that makes an opened ``img`` upright per its EXIF orientation tag (None if upright).

    Read from the header without decoding pixels: JPEG/WebP EXIF, and a PNG eXIf chunk placed before the pixel
    data (a late eXIf chunk is ignored, by the size checks and the loader alike). TIFFs return None: PIL applies
    their orientation tag itself on load and already reports the upright size. Unreadable EXIF counts as upright.
    """
    if isinstance(img, TiffImagePlugin.TiffImageFile):
        return None
    if isinstance(img, PngImagePlugin.PngImageFile) and "exif" not in img.info:
        return None  # PIL would decode the whole image to look for a late eXIf chunk
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF: metadata only, the pixels are still usable
        return None
    return _UPRIGHT.get(orientation) if isinstance(orientation, int) else None


def swaps_axes(method: Image.Transpose | None) -> bool:
    """True if the transposition exchanges width and height (90/270 degree rotations, transpose, transverse)."""
    return method in (
        Image.Transpose.TRANSPOSE,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_270,
    )


BitDepth = Union[Literal["auto"], int]
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_FLOAT_TOLERANCE = 1e-3
_low_bits_warned = False  # the 12-bit-in-16 warning is shown once per process


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


def decode_pil(img: Image.Image, bit_depth: BitDepth = "auto", path: str = "<image>") -> np.ndarray:
    """An opened PIL image -> float32 (H, W, 3) in [0, 1], turned upright by its EXIF orientation."""
    method = upright_transpose(img)
    arr, top = _decode(img if method is None else img.transpose(method), path, bit_depth)
    arr = np.clip(arr.astype(np.float32) / np.float32(top), 0.0, 1.0)
    return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr)


@contextmanager
def naming_the_file(path: str) -> Iterator[None]:
    """Turn any decoding failure inside the block into an AdxDataError that names ``path`` and the fix."""
    try:
        yield
    except AdxDataError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise AdxDataError(
            f"failed to decode image '{path}' ({type(exc).__name__}: {exc}). Replace or delete this file."
        ) from exc


def read_image(path: str, bit_depth: BitDepth = "auto") -> np.ndarray:
    """Decode ``path`` upright to float32 (H, W, 3) in [0, 1] at its own size; AdxDataError names the file."""
    with naming_the_file(path), Image.open(path) as img:
        return decode_pil(img, bit_depth, path)
