"""tools/equalize_brightness.py: a copy of a category whose images all have one mean brightness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "equalize_brightness.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def _save(path: Path, level: float, seed: int) -> None:
    """A textured grey image around ``level`` (0-255), with a few saturated pixels to test clipping."""
    rng = np.random.default_rng(seed)
    a = np.clip(level + rng.normal(0, 25, (24, 32)), 0, 255)
    a[:2, :2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8), "L").save(path)


def _mean(path: Path) -> float:
    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float32).mean() / 255)


def test_equal_brightness_copy_removes_a_brightness_confound(tmp_path: Path) -> None:
    src = tmp_path / "data" / "cat"
    for i in range(4):
        _save(src / "train" / "good" / f"{i:03d}.png", 150 + 10 * i, i)
        _save(src / "test" / "good" / f"{i:03d}.png", 110 + 5 * i, 10 + i)  # darker good test images
        _save(src / "test" / "crack" / f"{i:03d}.png", 190 + 5 * i, 20 + i)  # brighter defective ones
        _save(src / "ground_truth" / "crack" / f"{i:03d}_mask.png", 0, 30 + i)
    out = tmp_path / "equal"

    result = _run(str(tmp_path / "data"), "cat", str(out))
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "cat" / "equalize.json").read_text())
    assert record["test_brightness_image_AUROC_before"] == 1.0
    target = np.mean([_mean(p) for p in sorted((src / "train" / "good").glob("*.png"))])
    assert abs(record["target"] - target) < 1e-3
    written = sorted((out / "cat").rglob("*.png"))
    copies = [p for p in written if "ground_truth" not in p.parts]
    assert len(copies) == 12
    for path in copies:
        assert abs(_mean(path) - target) < 0.005, path
        before = np.asarray(Image.open(src / path.relative_to(out / "cat")), dtype=np.float32)
        after = np.asarray(Image.open(path), dtype=np.float32)
        assert np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.95  # a gain (clipped), not a new image
    masks = sorted(p.relative_to(src) for p in (src / "ground_truth").rglob("*.png"))
    assert masks and masks == sorted(
        p.relative_to(out / "cat") for p in (out / "cat" / "ground_truth").rglob("*.png")
    )
    assert not (out / "cat" / "ground_truth").is_symlink()

    again = _run(str(tmp_path / "data"), "cat", str(out))  # never overwrites
    assert again.returncode != 0 and "exists" in again.stderr
    bad = _run(str(tmp_path / "data"), "nothing_here", str(tmp_path / "other"))
    assert bad.returncode != 0 and "nothing_here" in bad.stderr
