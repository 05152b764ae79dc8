"""Listing and header checks on the real MVTec-layout images in ../shared/data (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adx.data import MVTec, check_samples, list_mvtec

SHARED = Path(os.environ.get("ADX_SHARED_DATA", Path(__file__).parents[2] / "../shared/data")).resolve()

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data not found at {SHARED}"),
]

# dataset, category, train/good, test/good, defective test images (README table)
COUNTS = [
    ("mvtec_ad", "screw", 320, 41, 119),
    ("magnetic_tile", "magnetic_tile", 400, 106, 388),
    ("mvtec_loco", "juice_bottle", 335, 54, 142),
]


@pytest.mark.parametrize(("dataset", "category", "n_train", "n_good", "n_bad"), COUNTS)
def test_real_counts_and_headers(dataset: str, category: str, n_train: int, n_good: int, n_bad: int) -> None:
    samples = list_mvtec(SHARED / dataset, category)
    train = [s for s in samples if s.split == "train"]
    good = [s for s in samples if s.split == "test" and s.label == 0]
    bad = [s for s in samples if s.split == "test" and s.label == 1]
    assert (len(train), len(good), len(bad)) == (n_train, n_good, n_bad)
    assert all(s.mask_path is not None for s in bad)  # every defect image has its mask
    check_samples(samples)


def test_real_datamodule_one_batch() -> None:
    dm = MVTec(root=str(SHARED / "magnetic_tile"), category="magnetic_tile", image_size=64, num_workers=0)
    dm.setup("fit")
    assert dm.name == "magnetic_tile" and len(dm.val_samples) == 40
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (16, 3, 64, 64)
