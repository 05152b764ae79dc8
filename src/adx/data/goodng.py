"""List a "good / ng" layout, common on factory lines.

Rules:
- ``train/good/`` holds the normal training images (required, non-empty).
- ``test/good/`` holds normal test images (optional).
- Every folder ``test/<ng...>/`` whose name starts with ``ng`` (e.g. ``ng``, ``ng_scratch``) holds defective
  images; its name is the defect type. Folders ending in ``_mask`` are mask folders, hidden folders are skipped,
  any other folder under ``test/`` is an error (rename it to ``good`` or ``ng_<type>``).
- Masks are optional per ng folder, looked up in ``ground_truth/<ng folder>/`` then ``test/<ng folder>_mask/`` as
  ``<stem>_mask.<ext>`` or ``<stem>.<ext>``. If one of these mask folders exists, every image of that ng folder
  needs a mask; if neither exists the images have no mask.
"""

from __future__ import annotations

from pathlib import Path

from adx.data.mvtec import check_root
from adx.data.samples import AdxDataError, Sample, find_mask, index_masks, list_images, subdirs


def list_goodng(root: str | Path) -> list[Sample]:
    """Train and test samples of a good/ng layout (see module docstring for the rules)."""
    root_path = check_root(root)
    train_dir = root_path / "train" / "good"
    train = list_images(train_dir) if train_dir.is_dir() else []
    if not train:
        raise AdxDataError(
            f"no images in '{train_dir}'. The good/ng layout needs normal training images there."
        )
    samples = [Sample(str(p), 0, "train") for p in train]
    test_dir = root_path / "test"
    if not test_dir.is_dir():
        raise AdxDataError(f"missing folder '{test_dir}'. Add test/good/ and test/ng*/ folders.")
    for folder in subdirs(test_dir):
        name = folder.name
        if name == "good":
            samples += [Sample(str(p), 0, "test") for p in list_images(folder)]
        elif name.endswith("_mask"):
            continue
        elif name.lower().startswith("ng"):
            mask_dirs = [
                d for d in (root_path / "ground_truth" / name, test_dir / f"{name}_mask") if d.is_dir()
            ]
            indexes = [index_masks(d) for d in mask_dirs]
            for img in list_images(folder):
                mask = find_mask(img.stem, indexes)
                if mask_dirs and mask is None:
                    raise AdxDataError(
                        f"no mask for defective image '{img}' although mask folder '{mask_dirs[0]}' exists. "
                        f"Add '{img.stem}_mask.png' there or remove the mask folder."
                    )
                samples.append(Sample(str(img), 1, "test", name, str(mask) if mask else None))
        else:
            raise AdxDataError(
                f"unexpected folder '{folder}': good/ng layout only allows test/good and test/ng*. "
                "Rename it to 'good' or 'ng_<defect>', or move it out of test/."
            )
    if not any(s.split == "test" for s in samples):
        raise AdxDataError(f"no test images under '{test_dir}'. Add images to test/good/ and test/ng*/.")
    return samples
