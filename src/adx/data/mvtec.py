"""List an MVTec-AD-layout category: ``train/good``, ``test/<type>``, ``ground_truth/<type>/<stem>_mask.png``."""

from __future__ import annotations

from pathlib import Path

from adx.data.samples import AdxDataError, Sample, find_mask, index_masks, list_images, subdirs

ROOT_ENV = "ADX_DATA_ROOT"


def _available_categories(root: Path) -> list[str]:
    """Sub-folders of ``root`` that look like categories (contain ``train/``), else all sub-folders."""
    dirs = subdirs(root)
    with_train = [d.name for d in dirs if (d / "train").is_dir()]
    return with_train or [d.name for d in dirs]


def check_root(root: str | Path | None) -> Path:
    """Return ``root`` as a Path, raising AdxDataError if it is unset or missing."""
    if root is None or str(root) == "":
        raise AdxDataError(
            f"no dataset root given. Pass --data.root /path/to/dataset or set the environment variable {ROOT_ENV}."
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise AdxDataError(
            f"dataset root '{path}' does not exist or is not a folder. "
            f"Pass the right folder with --data.root or set the environment variable {ROOT_ENV}."
        )
    return path


def list_mvtec(root: str | Path, category: str) -> list[Sample]:
    """Train and test samples of ``<root>/<category>`` in MVTec AD layout, sorted by path.

    Defect images need a mask ``ground_truth/<type>/<stem>_mask.png`` (or ``<stem>.png``) when the folder
    ``ground_truth/<type>`` exists; types without such a folder (MVTec LOCO style) get ``mask_path=None``.
    """
    root_path = check_root(root)
    base = root_path / category
    if not category or not base.is_dir():
        found = _available_categories(root_path)
        raise AdxDataError(
            f"category '{category}' not found under '{root_path}'. Available categories: "
            f"{', '.join(found) if found else '(none: the folder is empty)'}. Set --data.category to one of them."
        )
    train_dir = base / "train" / "good"
    if not train_dir.is_dir():
        raise AdxDataError(
            f"missing folder '{train_dir}'. MVTec layout needs normal training images in train/good/."
        )
    train = list_images(train_dir)
    if not train:
        raise AdxDataError(
            f"no images in '{train_dir}'. Put the normal training images (png/jpg/bmp/tif) there."
        )
    samples = [Sample(str(p), 0, "train") for p in train]

    test_dir = base / "test"
    if not test_dir.is_dir():
        raise AdxDataError(
            f"missing folder '{test_dir}'. MVTec layout needs test/good/ and test/<defect_type>/ folders; "
            "for train-only data use the Folder datamodule."
        )
    n_test = 0
    for type_dir in subdirs(test_dir):
        defect = type_dir.name
        images = list_images(type_dir)
        n_test += len(images)
        if defect == "good":
            samples += [Sample(str(p), 0, "test") for p in images]
            continue
        gt_dir = base / "ground_truth" / defect
        masks = index_masks(gt_dir)
        for img in images:
            mask = None
            if gt_dir.is_dir():
                mask = find_mask(img.stem, [masks])
                if mask is None:
                    hint = (
                        f" '{gt_dir / img.stem}' is a folder (MVTec LOCO multi-mask layout): merge its masks into "
                        f"'{gt_dir / img.stem}_mask.png'."
                        if (gt_dir / img.stem).is_dir()
                        else f" Add '{gt_dir / img.stem}_mask.png' (0/255, same size as the image)"
                        f" or remove the folder '{gt_dir}' if this defect type has no masks."
                    )
                    raise AdxDataError(f"no mask for defect image '{img}'.{hint}")
            samples.append(Sample(str(img), 1, "test", defect, str(mask) if mask else None))
    if n_test == 0:
        raise AdxDataError(
            f"no test images under '{test_dir}'. Add test/good/ and test/<defect_type>/ images."
        )
    return samples
