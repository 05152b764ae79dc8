"""Deterministic synthetic MVTec-layout category: a textured metal-like surface with scratches and stains."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from adx.data.samples import AdxDataError

MARKER = ".adx_synthetic.json"
LOCK = ".adx_synthetic.lock"
_VERSION = 1
_GENERATED = ("train", "test", "ground_truth")
_TINT = np.array([1.0, 0.97, 0.92], dtype=np.float32)


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """A brushed/woven surface (H, W, 3) in [0, 1] with random shift, brightness and smooth shading."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = rng.uniform(0, 16, size=2)  # small random shift of the periodic pattern
    angle = np.deg2rad(rng.uniform(-2.0, 2.0))
    u = (xx + dx) * np.cos(angle) + (yy + dy) * np.sin(angle)
    v = (yy + dy) * np.cos(angle) - (xx + dx) * np.sin(angle)
    weave = 0.045 * np.sin(2 * np.pi * u / 6.0) + 0.025 * np.sin(2 * np.pi * v / 9.0) * np.sin(
        2 * np.pi * u / 3.0
    )
    shade = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma=size / 8, mode="wrap")
    shade *= 0.05 / (shade.std() + 1e-8)
    grain = 0.015 * rng.standard_normal((size, size)).astype(np.float32)
    gray = 0.55 + rng.uniform(-0.04, 0.04) + weave + shade + grain
    return np.clip(gray[..., None] * _TINT, 0.0, 1.0)


def _scratch(rng: np.random.Generator, size: int, draw: ImageDraw.ImageDraw) -> None:
    """Draw a thin, slightly bent polyline onto the defect mask."""
    length = size * rng.uniform(0.15, 0.45)
    angle = rng.uniform(0, np.pi)
    start = rng.uniform(0.15 * size, 0.85 * size, size=2)
    points = [tuple(start)]
    n_seg = int(rng.integers(2, 5))
    for _ in range(n_seg):
        angle += rng.uniform(-0.35, 0.35)
        step = length / n_seg
        x, y = points[-1]
        points.append(
            (
                float(np.clip(x + step * np.cos(angle), 1, size - 2)),
                float(np.clip(y + step * np.sin(angle), 1, size - 2)),
            )
        )
    draw.line(points, fill=255, width=int(rng.integers(1, 3)) + size // 256)


def _blob(rng: np.random.Generator, size: int, draw: ImageDraw.ImageDraw) -> None:
    """Draw an irregular filled blob (stain/dent) onto the defect mask."""
    cx, cy = rng.uniform(0.15 * size, 0.85 * size, size=2)
    radius = size * rng.uniform(0.035, 0.09)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(7, 13))))
    radii = radius * rng.uniform(0.6, 1.3, size=angles.size)
    draw.polygon(
        [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a, r in zip(angles, radii, strict=True)],
        fill=255,
    )


def _defective(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add 1-3 scratches/stains to ``image``; return (image, 0/255 uint8 mask covering exactly the changes)."""
    size = image.shape[0]
    out = image.copy()
    total = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        is_scratch = rng.random() < 0.5
        (_scratch if is_scratch else _blob)(rng, size, draw)
        m = np.asarray(canvas) > 0
        if is_scratch:  # bright or dark line, texture still faintly visible
            delta = rng.uniform(0.15, 0.28) * rng.choice([-1.0, 1.0])
            out[m] = np.clip(out[m] + delta, 0.0, 1.0)
        else:  # brownish stain blended over the texture
            color = np.array([0.42, 0.33, 0.22], dtype=np.float32) * rng.uniform(0.8, 1.2)
            alpha = rng.uniform(0.35, 0.6)
            out[m] = (1 - alpha) * out[m] + alpha * color
        total |= m
    return out, total.astype(np.uint8) * 255


def _save(array: np.ndarray, path: Path) -> None:
    """Save a float [0,1] RGB array or a uint8 mask as PNG."""
    if array.dtype != np.uint8:
        array = np.round(array * 255).astype(np.uint8)
    Image.fromarray(array).save(path)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (waits for other holders; the OS drops it if we die)."""
    with open(path, "a+b") as handle:
        if os.name == "nt":  # pragma: no cover - Windows
            import msvcrt

            handle.seek(0)
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after about 10 s: keep waiting
                    continue
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_marker(root: Path) -> dict | None:
    """The marker's contents, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(root: Path, params: dict, complete: bool) -> None:
    """Replace the marker in one step, so a reader never sees half a file."""
    tmp = root / f"{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"params": params, "complete": complete}, indent=1))
    os.replace(tmp, root / MARKER)


def make_synthetic(
    root: str | Path,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_bad: int = 20,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Generate (or reuse, if ``<root>/.adx_synthetic.json`` matches the parameters) an MVTec-layout category.

    Writes ``train/good``, ``test/good``, ``test/defect`` and ``ground_truth/defect/NNN_mask.png`` under ``root``
    and returns ``root``. Output is byte-identical for the same parameters. Safe to call from several
    processes at once (every rank of a distributed run): one generates under a file lock, the others wait
    for it and reuse its images.
    """
    if n_train < 1 or n_test_good < 0 or n_test_bad < 0 or n_test_good + n_test_bad < 1:
        raise AdxDataError(
            f"synthetic counts n_train={n_train}, n_test_good={n_test_good}, n_test_bad={n_test_bad} are invalid: "
            "need n_train >= 1 and at least one test image."
        )
    if size < 32:
        raise AdxDataError(f"synthetic size={size} is too small; use --data.size 32 or more.")
    root = Path(root).expanduser()
    params = {"version": _VERSION, "n_train": n_train, "n_test_good": n_test_good, "n_test_bad": n_test_bad}
    params |= {"size": size, "seed": seed}

    def done() -> bool:
        state = _read_marker(root)
        return bool(state and state.get("params") == params and state.get("complete"))

    if done():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / LOCK):
        if done():  # another process generated it while this one waited
            return root
        if not (root / MARKER).is_file() and any((root / d).exists() for d in _GENERATED):
            raise AdxDataError(
                f"'{root}' already has train/test/ground_truth folders that were not made by make_synthetic "
                f"(no {MARKER}). Refusing to overwrite: pick another --data.root or empty that folder."
            )
        _write_marker(root, params, complete=False)
        for d in _GENERATED:
            shutil.rmtree(root / d, ignore_errors=True)
        _generate(root, n_train, n_test_good, n_test_bad, size, seed)
        _write_marker(root, params, complete=True)
    return root


def _generate(root: Path, n_train: int, n_test_good: int, n_test_bad: int, size: int, seed: int) -> None:
    """Write the images and masks of every split under ``root``."""
    folders = {k: root / k for k in ("train/good", "test/good", "test/defect", "ground_truth/defect")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for split_id, key, count in (
        (0, "train/good", n_train),
        (1, "test/good", n_test_good),
        (2, "test/defect", n_test_bad),
    ):
        for i in range(count):
            rng = np.random.default_rng([seed, split_id, i])
            image = _surface(rng, size)
            if key == "test/defect":
                image, mask = _defective(rng, image)
                _save(mask, folders["ground_truth/defect"] / f"{i:03d}_mask.png")
            _save(image, folders[key] / f"{i:03d}.png")
