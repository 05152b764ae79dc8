"""Offline image pools: a user folder > the photographs scikit-image installs > procedural noise.

``TextureSource`` feeds synthetic anomalies (DRAEM-style, DTD in the papers); ``NaturalImages`` gives
natural-image crops for penalty losses (EfficientAD's ImageNet penalty). Both resolve their files once
at construction, never download anything, and report what they used through ``provenance()``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from adx.models.components.sources.augment import texture_augment
from adx.models.components.sources.noise import procedural_image, uniform

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
PACKAGE = ("scikit-image", "skimage")  # (distribution, import name) of the package whose photographs we use
# files in skimage/data that are drawings, test patterns or tiny animations rather than photographs
PACKAGE_SKIP = frozenset(
    {
        "chessboard_GRAY.png",
        "chessboard_RGB.png",
        "horse.png",
        "logo.png",
        "phantom.png",
        "no_time_for_that_tiny.gif",
    }
)
MIN_SIDE = 64  # package images with a smaller side are skipped
CACHE_FILES = 64  # pools of at most this many files keep their decoded images in memory


class SourceError(FileNotFoundError):
    """A user-given image folder does not exist or holds no images."""


class SourceImageError(ValueError):
    """An image file of a source could not be decoded."""


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files skipped); SourceError if none."""
    root = Path(folder).expanduser()
    fix = "pass an existing folder of images (e.g. DTD's images/) or leave the folder unset for the built-in sources"
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise SourceError(f"image source folder '{root}' {what}: {fix}.")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise SourceError(
            f"image source folder '{root}' holds no images ({suffixes}, searched recursively): {fix}."
        )
    return files


def _min_side(path: Path) -> int:
    try:
        with Image.open(path) as img:
            return min(img.size)
    except Exception:
        return 0


def package_image_files() -> tuple[str, str, Path, list[Path]] | None:
    """(distribution, version, folder, files) of the photographs scikit-image ships, or None.

    Lists ``skimage/data`` on disk without importing scikit-image, so nothing is ever downloaded.
    """
    spec = importlib.util.find_spec(PACKAGE[1])
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not folder.is_dir():
        return None
    files = [
        p
        for p in sorted(folder.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in PACKAGE_SKIP and _min_side(p) >= MIN_SIDE
    ]
    if not files:
        return None
    try:
        version = importlib.metadata.version(PACKAGE[0])
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return PACKAGE[0], version, folder, files


def files_sha256(root: Path, files: Sequence[Path]) -> str:
    """SHA-256 of the sorted 'relative path<TAB>size' lines of ``files``: cheap, machine-independent."""
    lines = sorted(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}" for p in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_image(path: str | Path) -> Tensor:
    """Decode any image file to uint8 [3, H, W] (gray repeated, alpha dropped); SourceImageError on failure."""
    try:
        with Image.open(path) as img:
            if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                arr = np.asarray(img, dtype=np.float32)
                arr = np.clip(arr / max(float(arr.max(initial=0.0)), 1e-6) * 255.0, 0, 255).astype(np.uint8)
            else:
                arr = np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL raises many types for corrupt files
        raise SourceImageError(
            f"failed to decode image '{path}' ({type(exc).__name__}: {exc}): replace or delete it."
        ) from exc
    tensor = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True))
    return tensor.expand(3, *tensor.shape) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def random_crop(
    image: Tensor,
    size: tuple[int, int],
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.25, 1.0),
) -> Tensor:
    """Random crop of ``image`` [C, H, W] (uint8 or float) with the aspect of ``size`` covering a fraction
    in ``scale`` of its area (as far as it fits), resized to ``size``: float [C, *size] in [0, 1]."""
    h, w = image.shape[-2:]
    aspect = size[1] / size[0]
    area = uniform(scale[0], scale[1], generator) * h * w
    ch, cw = math.sqrt(area / aspect), math.sqrt(area * aspect)
    shrink = min(1.0, h / ch, w / cw)
    ch, cw = max(1, min(h, round(ch * shrink))), max(1, min(w, round(cw * shrink)))
    top = int(torch.randint(0, h - ch + 1, (), generator=generator))
    left = int(torch.randint(0, w - cw + 1, (), generator=generator))
    crop = image[:, top : top + ch, left : left + cw]
    crop = crop.float() / 255.0 if crop.dtype == torch.uint8 else crop.float()
    if (ch, cw) != tuple(size):
        crop = F.interpolate(crop[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return crop.clamp(0.0, 1.0)


def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """int or (H, W) -> (H, W) of positive ints."""
    hw = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
    return hw  # type: ignore[return-value]


@dataclass
class _Pool:
    """Resolved files of a source: kind folder|package|procedural."""

    kind: str
    name: str
    version: str | None
    root: Path | None = None
    files: list[Path] = field(default_factory=list)


def resolve_pool(folder: str | Path | None, role: str) -> _Pool:
    """The pool for ``folder`` (must hold images), else the package photographs, else procedural noise."""
    if folder is not None and str(folder) != "":
        root = Path(folder).expanduser().resolve()
        return _Pool("folder", str(root), None, root, list_image_files(root))
    found = package_image_files()
    if found is not None:
        name, version, root, files = found
        return _Pool("package", name, version, root, files)
    try:
        version = importlib.metadata.version("adx")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    warnings.warn(
        f"no {role} folder given and no photographs of {PACKAGE[0]} on disk: using procedural fractal noise. "
        f"For realistic {role}, pass a folder of images (e.g. DTD) or `pip install {PACKAGE[0]}`.",
        stacklevel=3,
    )
    return _Pool("procedural", "adx.fractal_noise", version)


def _item_generator(seed: int, index: int) -> torch.Generator:
    """A generator seeded by a hash of (seed, index); torch's CPU generator keeps only 32 seed bits."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


class _ImageSource:
    """Shared file handling of TextureSource and NaturalImages."""

    role = "images"

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = None if folder is None else str(folder)
        self._pool = resolve_pool(folder, self.role)
        self._cache: dict[int, Tensor] = {}
        self._hash = files_sha256(self._pool.root, self._pool.files) if self._pool.files else None

    @property
    def kind(self) -> str:
        """Where the images come from: folder, package or procedural."""
        return self._pool.kind

    @property
    def files(self) -> list[Path]:
        """The image files in use (empty when procedural)."""
        return list(self._pool.files)

    def provenance(self) -> dict[str, Any]:
        """What this source used, JSON-ready: role, kind, name, version, num_files, files_sha256."""
        pool = self._pool
        return {
            "role": self.role,
            "kind": pool.kind,
            "name": pool.name,
            "version": pool.version,
            "num_files": len(pool.files),
            "files_sha256": self._hash,
        }

    def describe(self) -> dict[str, Any]:
        """Same as ``provenance()``."""
        return self.provenance()

    def load(self, index: int) -> Tensor:
        """Decoded file ``index`` as uint8 [3, H, W] (kept in memory when the pool is small)."""
        if index in self._cache:
            return self._cache[index]
        image = read_image(self._pool.files[index])
        if len(self._pool.files) <= CACHE_FILES:
            self._cache[index] = image
        return image

    def _pick(
        self, size: tuple[int, int], generator: torch.Generator | None, scale: tuple[float, float]
    ) -> Tensor:
        """A random crop of a random file, or a procedural image: float [3, *size] in [0, 1]."""
        if not self._pool.files:
            return procedural_image(size[0], size[1], generator)
        index = int(torch.randint(0, len(self._pool.files), (), generator=generator))
        return random_crop(self.load(index), size, generator, scale)

    def __repr__(self) -> str:
        p = self.provenance()
        return f"{type(self).__name__}(kind={p['kind']!r}, name={p['name']!r}, num_files={p['num_files']})"


class TextureSource(_ImageSource):
    """Anomaly textures: random crops of a folder (e.g. DTD) / package photographs / procedural noise.

    ``sample(size, generator)`` -> float [3, H, W] in [0, 1]; with ``augment`` three random colour
    transforms are applied (gamma, brightness, sharpness, hue, solarize, posterize, invert,
    autocontrast, equalize), and the crop is flipped at random.
    """

    role = "textures"

    def __init__(
        self, folder: str | Path | None = None, augment: bool = True, scale: tuple[float, float] = (0.25, 1.0)
    ):
        super().__init__(folder)
        self.augment = augment
        self.scale = tuple(scale)

    def sample(self, size: int | Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """One texture [3, H, W] in [0, 1] of ``size`` (int or (H, W))."""
        texture = self._pick(as_size(size), generator, self.scale)
        flips = torch.rand(2, generator=generator) < 0.5
        dims = [d for d, f in zip((-1, -2), flips.tolist(), strict=True) if f]
        if dims:
            texture = texture.flip(dims)
        return texture_augment(texture, generator) if self.augment else texture


class NaturalImages(_ImageSource, Dataset):
    """Natural-image crops [3, H, W] in [0, 1] for penalty losses (EfficientAD's ImageNet penalty).

    A map-style Dataset of ``length`` items (item i is seeded by (seed, i), so it is the same in every
    worker and epoch) and an infinite iterator (``iter(images)`` walks i = 0, 1, 2, ...).
    Each item: random crop of ``scale`` of the area, resized to ``size``, flipped horizontally with
    p = 0.5, converted to grey with p = ``grayscale``.
    """

    role = "natural images"

    def __init__(
        self,
        folder: str | Path | None = None,
        size: int | Sequence[int] = (256, 256),
        length: int = 10_000,
        seed: int = 0,
        scale: tuple[float, float] = (0.25, 1.0),
        grayscale: float = 0.0,
    ) -> None:
        super().__init__(folder)
        self.size = as_size(size)
        self.length = int(length)
        self.seed = int(seed)
        self.scale = tuple(scale)
        self.grayscale = float(grayscale)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One natural-image crop [3, H, W] in [0, 1] drawn with ``generator``."""
        image = self._pick(self.size, generator, self.scale)
        flip, gray = torch.rand(2, generator=generator).tolist()
        if flip < 0.5:
            image = image.flip(-1)
        if gray < self.grayscale:
            image = (
                (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1))
                .sum(0, keepdim=True)
                .expand(3, -1, -1)
            )
        return image.contiguous()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return self.sample(_item_generator(self.seed, index % self.length))

    def __iter__(self) -> Iterator[Tensor]:
        """Endless items 0, 1, 2, ... (beyond ``length`` too), each seeded by (seed, index)."""
        for index in itertools.count():
            yield self.sample(_item_generator(self.seed, index))
