"""The trivial detector: each test image's mean brightness as its anomaly score, per shared category.

    python tools/brightness_baseline.py --data ../shared/data --out docs/bench/brightness_baseline.json

A method's image AUROC means little on a category where this scores near 1 (or near 0: the reverse
ordering): the test set's good and defective images then differ in overall brightness, which any model
sensitive to global intensity picks up without seeing a defect. Reports AUROC (torchmetrics) and the mean
brightness (grayscale, [0, 1]) of the good and defective test images and of the training images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.classification import binary_auroc

CATEGORIES = (("mvtec_ad", "screw"), ("magnetic_tile", "magnetic_tile"), ("mvtec_loco", "juice_bottle"))
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def brightness(path: Path) -> float:
    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float32).mean() / 255)


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="folder holding mvtec_ad, magnetic_tile and mvtec_loco")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for dataset, category in CATEGORIES:
        root = Path(args.data) / dataset / category
        test = [(p, 0 if p.parent.name == "good" else 1) for p in images(root / "test")]
        scores = torch.tensor([brightness(p) for p, _ in test])
        labels = torch.tensor([y for _, y in test])
        train = [brightness(p) for p in images(root / "train" / "good")]
        rows.append(
            {
                "dataset": dataset,
                "category": category,
                "test_images": len(test),
                "image_AUROC_of_brightness": round(float(binary_auroc(scores, labels)), 4),
                "mean_brightness_good_test": round(float(scores[labels == 0].mean()), 4),
                "mean_brightness_defective_test": round(float(scores[labels == 1].mean()), 4),
                "mean_brightness_train": round(float(np.mean(train)), 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(
        json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
