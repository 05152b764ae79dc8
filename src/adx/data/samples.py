"""Sample records, the data error type and cheap up-front checks of image/mask files."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from adx.imageio import AdxDataError, AdxDataWarning, swaps_axes, upright_transpose

__all__ = [
    "AdxDataError",
    "AdxDataWarning",
    "Sample",
    "swaps_axes",
    "upright_transpose",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MAX_LISTED_PROBLEMS = 10


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: where it is, its label, split, defect type and optional mask."""

    image_path: str
    label: int  # 0 good, 1 anomalous, -1 unknown
    split: str  # "train" | "test" | "predict"
    defect_type: str = "good"
    mask_path: str | None = None


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(W, H) of an opened image once turned upright by its EXIF orientation (header only)."""
    w, h = img.size
    return (h, w) if swaps_axes(upright_transpose(img)) else (w, h)


def is_image_file(path: str | Path) -> bool:
    """Return True if ``path`` has a supported image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Sorted image files in ``folder`` (hidden files skipped); non-image files are ignored."""
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.is_file()
        and is_image_file(p)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def subdirs(folder: str | Path) -> list[Path]:
    """Sorted non-hidden sub-folders of ``folder``."""
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))


def index_masks(folder: str | Path) -> dict[str, Path]:
    """Map file stem -> path for the images directly in ``folder`` (empty if the folder is missing)."""
    folder = Path(folder)
    return {p.stem: p for p in list_images(folder)} if folder.is_dir() else {}


def find_mask(stem: str, indexes: Sequence[dict[str, Path]]) -> Path | None:
    """First ``<stem>_mask.<ext>`` or ``<stem>.<ext>`` (any image extension) in the given mask indexes."""
    for index in indexes:
        for name in (f"{stem}_mask", stem):
            if name in index:
                return index[name]
    return None


def _image_size(path: str, what: str) -> tuple[int, int]:
    """Open only the header of ``path`` and return its upright (W, H); raise AdxDataError if unreadable."""
    try:
        with Image.open(path) as img:
            return upright_size(img)
    except FileNotFoundError:
        raise AdxDataError(
            f"{what} not found: '{path}'. Restore the file or remove it from the dataset."
        ) from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise AdxDataError(
            f"cannot open {what} '{path}' ({type(exc).__name__}: {exc}). "
            "Replace or delete the corrupt file, or convert it to PNG."
        ) from exc


def check_samples(samples: Iterable[Sample], verify_images: bool = True) -> None:
    """Check every image (and mask) exists; with ``verify_images`` also open headers and compare mask sizes.

    Sizes are compared in the upright frame (after EXIF orientation), as the loader sees them.

    All problems are collected and reported together (first ten) in one AdxDataError.
    """
    problems: list[str] = []
    for sample in samples:
        try:
            if not verify_images:
                for path, what in ((sample.image_path, "image"), (sample.mask_path, "mask")):
                    if path is not None and not Path(path).is_file():
                        raise AdxDataError(
                            f"{what} not found: '{path}'. Restore the file or remove it from the dataset."
                        )
                continue
            size = _image_size(sample.image_path, "image")
            if sample.mask_path is not None:
                mask_size = _image_size(sample.mask_path, f"mask of image '{sample.image_path}'")
                if mask_size != size:
                    raise AdxDataError(
                        f"mask '{sample.mask_path}' is {mask_size[0]}x{mask_size[1]} (WxH) but its image "
                        f"'{sample.image_path}' is {size[0]}x{size[1]}. Masks must have the image's size: "
                        "re-export the mask at the image resolution."
                    )
        except AdxDataError as exc:
            problems.append(str(exc))
    if problems:
        shown = "\n  - ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = len(problems) - _MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise AdxDataError(f"{len(problems)} data problem(s) found before training:\n  - {shown}{tail}")
