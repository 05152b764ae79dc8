"""Score a checkpoint's test images again with one inference-only attribute of its torch model changed.

    python tools/rescore.py CKPT ../shared/data/mvtec_ad screw --image-size 128 --attr smoothing --values 1 11 21

For settings that act only at inference (DRAEM's and DSR's ``smoothing`` before the image maximum,
GANomaly's ``score``): prints the image AUROC for each value, with no retraining. Values are parsed as
YAML (ints, floats, strings).
"""

from __future__ import annotations

import argparse

import torch
import yaml

from adx.data import MVTec
from adx.deploy_cli import load_model
from adx.metrics import image_auroc  # exact; torchmetrics' binary_auroc would squash scores > 1 by a sigmoid


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt")
    parser.add_argument("root")
    parser.add_argument("category")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--attr", required=True, help="attribute of the torch model (module.model)")
    parser.add_argument("--values", nargs="+", required=True)
    args = parser.parse_args()
    module = load_model(args.ckpt).eval()
    if not hasattr(module.model, args.attr):
        raise SystemExit(f"rescore: {type(module.model).__name__} has no attribute {args.attr!r}")
    dm = MVTec(
        root=args.root, category=args.category, image_size=args.image_size, eval_batch_size=16, num_workers=0
    )
    dm.setup("test")
    batches = list(dm.test_dataloader())
    labels = torch.cat([b["label"] for b in batches]).int()
    for raw in args.values:
        setattr(module.model, args.attr, yaml.safe_load(raw))
        with torch.no_grad():
            scores = torch.cat([module.model(b["image"])[0] for b in batches])
        print(f"{args.attr}={raw}: image AUROC {image_auroc(scores, labels):.3f} ({len(labels)} images)")


if __name__ == "__main__":
    main()
