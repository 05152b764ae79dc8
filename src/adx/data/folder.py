"""List a custom folder layout: one folder of normal images, optional folders of abnormal images and masks.

Rules:
- All folders are relative to ``root`` (absolute paths also work); images directly inside them are used.
- Normal images go to train. With ``normal_test_dir`` set, its images are the good test images; otherwise a
  seeded ``normal_split_ratio`` fraction of the normal images is moved to the test set.
- Each folder in ``abnormal_dirs`` is a defect type named after the folder (label 1, test split).
- With ``mask_dir`` set, every abnormal image needs a mask ``<stem>.<ext>`` or ``<stem>_mask.<ext>``, looked
  up first in ``<mask_dir>/<abnormal folder name>/`` then in ``<mask_dir>/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adx.data.mvtec import check_root
from adx.data.samples import AdxDataError, Sample, find_mask, index_masks, list_images


def _images_in(root: Path, rel: str, key: str) -> list[Path]:
    """Images in ``root/rel``; raise AdxDataError naming the folder and the config key if missing/empty."""
    folder = root / rel
    if not folder.is_dir():
        raise AdxDataError(
            f"folder '{folder}' (--data.{key}) does not exist. Fix --data.{key} or create the folder."
        )
    images = list_images(folder)
    if not images:
        raise AdxDataError(
            f"no images (png/jpg/jpeg/bmp/tif/tiff) in '{folder}' (--data.{key}). Add images or fix --data.{key}."
        )
    return images


def split_normal(images: list[Path], ratio: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Seeded split of normal images into (train, test) with ``round(ratio * n)`` test images, >=1 train."""
    if not 0.0 <= ratio < 1.0:
        raise AdxDataError(
            f"normal_split_ratio must be in [0, 1), got {ratio}. Fix --data.normal_split_ratio."
        )
    n_test = min(round(ratio * len(images)), len(images) - 1)
    order = np.random.default_rng(seed).permutation(len(images))
    test_idx = set(order[:n_test].tolist())
    train = [p for i, p in enumerate(images) if i not in test_idx]
    test = [p for i, p in enumerate(images) if i in test_idx]
    return train, test


def list_folder(
    root: str | Path,
    normal_dir: str = "good",
    abnormal_dirs: list[str] | None = None,
    mask_dir: str | None = None,
    normal_test_dir: str | None = None,
    normal_split_ratio: float = 0.2,
    seed: int = 0,
) -> list[Sample]:
    """Train and test samples of a custom folder layout (see module docstring for the rules)."""
    root_path = check_root(root)
    normal = _images_in(root_path, normal_dir, "normal_dir")
    if normal_test_dir is not None:
        train, test_good = normal, _images_in(root_path, normal_test_dir, "normal_test_dir")
    else:
        train, test_good = split_normal(normal, normal_split_ratio, seed)
    samples = [Sample(str(p), 0, "train") for p in train] + [Sample(str(p), 0, "test") for p in test_good]

    mask_root: Path | None = None
    flat_masks: dict[str, Path] = {}
    if mask_dir is not None:
        mask_root = root_path / mask_dir
        if not mask_root.is_dir():
            raise AdxDataError(
                f"mask folder '{mask_root}' (--data.mask_dir) does not exist. Fix it or set it to null."
            )
        flat_masks = index_masks(mask_root)
    for rel in abnormal_dirs or []:
        defect = Path(rel).name
        images = _images_in(root_path, rel, "abnormal_dirs")
        indexes = [index_masks(mask_root / defect), flat_masks] if mask_root is not None else []
        for img in images:
            mask = find_mask(img.stem, indexes) if mask_root is not None else None
            if mask_root is not None and mask is None:
                raise AdxDataError(
                    f"no mask for abnormal image '{img}': expected '{img.stem}.png' or '{img.stem}_mask.png' in "
                    f"'{mask_root / defect}' or '{mask_root}'. Add the mask or set --data.mask_dir null."
                )
            samples.append(Sample(str(img), 1, "test", defect, str(mask) if mask else None))
    return samples
