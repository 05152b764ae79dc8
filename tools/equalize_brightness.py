"""A copy of an MVTec-layout category in which every image has the same mean brightness (a control).

    python tools/equalize_brightness.py ../shared/data/mvtec_ad screw /tmp/screw_equal [--target 0.7]

On a category whose good and defective test images differ in overall brightness (screw here: the mean
brightness alone scores 1.000 image AUROC, tools/brightness_baseline.py), a method's image AUROC mixes
defect detection with brightness. This writes ``OUT/<category>/`` with every training and test image
scaled by its own factor (a lighting gain, clipped to [0, 255]) so that its mean grey level is ``--target``
(default: the mean over the training images), and copies ``ground_truth`` unchanged (scaling moves no
defect; a copy, not a link: anomalib's MVTec reader does not follow a linked folder). Train both sides of a comparison on the copy (``tools/bench.py <method> OUT <category> ...``): what
is left of an image AUROC there is not overall brightness. Images are written as PNG (lossless) under
their own names; the copy belongs outside the project (it is the shared data, rescaled). The brightness
AUROC of the test images before and after is printed and written to ``OUT/<category>/equalize.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.classification import binary_auroc

from brightness_baseline import brightness, images  # tools/ is on sys.path when run as a script

ITERATIONS = 4
"""Rescaling passes per image: clipping lowers the mean of bright images, so the gain is refined."""


def equalize(source: Path, target: float) -> tuple[Image.Image, float]:
    """The image scaled so its mean grey level ([0, 1]) is ``target`` as nearly as clipping allows; its mean."""
    image = Image.open(source)
    mode = "L" if image.mode in ("L", "I;16", "I") else "RGB"
    original = np.asarray(image.convert(mode), dtype=np.float32)
    luma = (lambda a: a) if mode == "L" else (lambda a: a @ np.array([0.299, 0.587, 0.114], np.float32))
    gain, out = 1.0, original
    for _ in range(ITERATIONS):
        mean = float(luma(out).mean()) / 255
        if mean <= 0:
            break
        gain *= target / mean
        out = np.clip(original * gain, 0, 255)
    out = np.round(out).astype(np.uint8)
    return Image.fromarray(out, mode), float(luma(out.astype(np.float32)).mean()) / 255


def brightness_auroc(test: list[tuple[Path, int]], values: list[float]) -> float:
    return round(float(binary_auroc(torch.tensor(values), torch.tensor([y for _, y in test]))), 4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", help="folder holding the category (e.g. ../shared/data/mvtec_ad)")
    parser.add_argument("category")
    parser.add_argument("out", help="folder to write <category>/ into (outside the project)")
    parser.add_argument("--target", type=float, help="mean grey level in (0, 1); default: the training mean")
    args = parser.parse_args()
    source = Path(args.root) / args.category
    if not (source / "train" / "good").is_dir() or not (source / "test").is_dir():
        sys.exit(f"equalize_brightness: {source} has no train/good and test folders (MVTec layout)")
    dest = Path(args.out) / args.category
    if dest.exists():
        sys.exit(f"equalize_brightness: {dest} exists; remove it or pick another OUT (nothing overwritten)")
    train = images(source / "train" / "good")
    target = args.target if args.target is not None else float(np.mean([brightness(p) for p in train]))
    if not 0.0 < target < 1.0:
        sys.exit(f"equalize_brightness: --target must be in (0, 1), got {target}")
    test = [(p, 0 if p.parent.name == "good" else 1) for p in images(source / "test")]
    before = [brightness(p) for p, _ in test]
    after: list[float] = []
    worst = 0.0
    for path in [*train, *(p for p, _ in test)]:
        image, mean = equalize(path, target)
        out = (dest / path.relative_to(source)).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        worst = max(worst, abs(mean - target))
        if path.parts[len(source.parts)] == "test":
            after.append(mean)
    if (source / "ground_truth").is_dir():
        shutil.copytree(source / "ground_truth", dest / "ground_truth")
    record = {
        "command": "python " + " ".join(sys.argv),
        "source": str(source.resolve()),
        "target": round(target, 4),
        "images": len(train) + len(test),
        "largest_deviation_from_target": round(worst, 4),
        "test_brightness_image_AUROC_before": brightness_auroc(test, before),
        "test_brightness_image_AUROC_after": brightness_auroc(test, after),
    }
    (dest / "equalize.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
