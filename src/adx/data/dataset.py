"""Torch dataset over Samples: RGB image in [0, 1] and aligned binary mask, both resized to ``image_size``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from adx.data.samples import AdxDataError, Sample


def to_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise ``image_size`` (int = square, or (H, W)) to a (H, W) tuple of positive ints."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        raise AdxDataError(
            f"image_size must be a positive int or [H, W] of positive ints, got {image_size!r}. Fix --data.image_size."
        )
    return int(hw[0]), int(hw[1])


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert any PIL image (L, LA, P, RGBA, 16-bit, float, CMYK...) to float32 (H, W, 3) in [0, 1]."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        arr = arr / 255.0 if arr.max(initial=0.0) > 1.0 else arr
    else:
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB").convert(
                "RGB"
            )
        arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = np.clip(arr, 0.0, 1.0)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr


def _to_binary_mask(img: Image.Image) -> np.ndarray:
    """Mask as bool (H, W): palette/1-bit masks are foreground where non-zero, others above half their max."""
    if img.mode in ("1", "P"):
        return np.asarray(img) > 0
    if img.mode not in ("L", "I", "F") and not img.mode.startswith("I;16"):
        img = img.convert("L")
    arr = np.asarray(img, dtype=np.float32)
    peak = arr.max(initial=0.0)
    return arr > peak / 2 if peak > 0 else np.zeros(arr.shape, dtype=bool)


def load_image(path: str, size: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``path`` to float32 (H, W, 3) in [0, 1], resized to ``size`` (H, W) if given.

    Returns the array and the file's original (H, W). Resizing is antialiased bilinear. 8-bit gray/RGB
    images at least twice the target size on both axes are resized by PIL before conversion to float
    (JPEGs decode directly at a reduced scale no smaller than twice the target): 5x faster for a
    1600x1200 JPEG, equal to the float path within 2 grey levels. Smaller downscales keep the float path.
    Raises AdxDataError naming the path on failure.
    """
    try:
        with Image.open(path) as img:
            w, h = img.size
            if size is None or (h, w) == tuple(size):
                return _to_rgb_array(img), (h, w)
            if img.mode in ("L", "RGB") and h >= 2 * size[0] and w >= 2 * size[1]:
                img.draft(img.mode, (2 * size[1], 2 * size[0]))  # JPEG only; no-op for other formats
                small = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                return _to_rgb_array(small), (h, w)
            return _resize_array(_to_rgb_array(img), size), (h, w)
    except Exception as exc:  # PIL raises many types for corrupt files
        raise AdxDataError(
            f"failed to decode image '{path}' ({type(exc).__name__}: {exc}). Replace or delete this file."
        ) from exc


def _resize_array(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 (H, W, 3) -> (size[0], size[1], 3), antialiased bilinear."""
    image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    return image[0].clamp_(0.0, 1.0).permute(1, 2, 0).numpy()


def load_mask(path: str) -> np.ndarray:
    """Decode a mask file to bool (H, W); raise AdxDataError naming the path on failure."""
    try:
        with Image.open(path) as img:
            return _to_binary_mask(img)
    except Exception as exc:
        raise AdxDataError(
            f"failed to decode mask '{path}' ({type(exc).__name__}: {exc}). Replace this file."
        ) from exc


class AnomalyDataset(Dataset):
    """Dataset of Samples returning dicts: image [3,H,W] in [0,1], mask [1,H,W] 0/1, label, path and metadata."""

    def __init__(self, samples: Sequence[Sample], image_size: int | tuple[int, int]) -> None:
        self.samples = list(samples)
        self.image_size = to_hw(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        array, (h, w) = load_image(sample.image_path, self.image_size)
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        if sample.mask_path is not None:
            mask_array = load_mask(sample.mask_path)
            if mask_array.shape != (h, w):
                raise AdxDataError(
                    f"mask '{sample.mask_path}' is {mask_array.shape[1]}x{mask_array.shape[0]} (WxH) but image "
                    f"'{sample.image_path}' is {w}x{h}. Re-export the mask at the image resolution."
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
