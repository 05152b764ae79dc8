"""Where a fitted model's anomaly maps peak, and what other ways of scoring an image from them would give.

    python tools/map_peaks.py results/fastflow/mvtec_ad/screw/v0/checkpoints/last.ckpt \
        --root ../shared/data/mvtec_ad --category screw [--size 256] [--margin 4 16]

Runs the model of an adx checkpoint (any method) on the category's training and test images and prints
one JSON object:
- how many test (and training) maps have their maximum within ``--border`` px of the image edge;
- image AUROC of the shipped score (the map's maximum), of the maximum over the interior only (each
  ``--margin``), of the maximum after subtracting the per-pixel mean of the training maps, and of the
  maximum of the per-pixel z-score against the training maps.
Only training (normal) images calibrate; test labels are used for the AUROCs alone. An analysis, not a
shipped scoring option.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import Tensor

from adx.data import MVTec
from adx.metrics import image_auroc
from adx.models import MODELS


def _maps(model: torch.nn.Module, loader) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    maps, labels = [], []
    for batch in loader:
        _, amap = model(batch["image"])
        maps.append(amap.float())
        labels.append(torch.as_tensor(batch["label"]))
    return torch.cat(maps), torch.cat(labels)


def _near_border(maps: Tensor, border: int) -> int:
    h, w = maps.shape[-2:]
    idx = maps.flatten(1).argmax(1)
    r, c = idx // w, idx % w
    dist = torch.minimum(torch.minimum(r, h - 1 - r), torch.minimum(c, w - 1 - c))
    return int((dist < border).sum())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt")
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--border", type=int, default=4, help="px from the edge that count as the border")
    parser.add_argument("--margin", type=int, nargs="*", default=[4, 16])
    args = parser.parse_args()

    state = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    name = state.get("adx_model")
    if name not in MODELS:
        raise SystemExit(f"{args.ckpt}: not an adx checkpoint of a known model (adx_model={name!r})")
    torch.set_grad_enabled(False)
    model = MODELS[name].load_from_checkpoint(args.ckpt, map_location="cpu").eval().model
    dm = MVTec(root=args.root, category=args.category, image_size=args.size, batch_size=16, num_workers=0)
    dm.setup("fit")
    dm.setup("test")
    train, _ = _maps(model, dm.train_dataloader())
    test, labels = _maps(model, dm.test_dataloader())
    mean, std = train.mean(0), train.std(0) + 1e-6

    def auroc(maps: Tensor) -> float:
        return round(float(image_auroc(maps.flatten(1).amax(1), labels)), 4)

    report = {
        "model": name,
        "category": args.category,
        "test_max_near_border": f"{_near_border(test, args.border)}/{len(test)}",
        "train_max_near_border": f"{_near_border(train, args.border)}/{len(train)}",
        "image_AUROC": {
            "max (shipped)": auroc(test),
            **{f"max over interior, {m} px margin": auroc(test[:, m:-m, m:-m]) for m in args.margin},
            "max of map - training mean": auroc(test - mean),
            "max of z-score vs training": auroc((test - mean) / std),
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
