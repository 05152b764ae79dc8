"""PatchCore ablations on one MVTec-layout category with the plain torch model (no Lightning).

    python tools/ablate_patchcore.py --root ../shared/data/mvtec_ad --category screw --size 256 \
        --ratio 0.01 [--norm imagenet] [--set num_neighbors=1] [--threads 1]

Prints one JSON line: image/pixel AUROC and the seconds spent embedding, subsampling and testing.
``--norm imagenet`` replaces the backbone's own normalisation (timm pretrained_cfg) by ImageNet
mean/std, the peer's fixed choice, to measure what that choice costs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from adx.data import MVTec
from adx.metrics import image_auroc, pixel_auroc
from adx.models.patchcore.torch_model import PatchCoreModel

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--norm", choices=["backbone", "imagenet"], default="backbone")
    parser.add_argument("--set", action="append", default=[], help="PatchCoreModel argument key=value")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    dm = MVTec(root=args.root, category=args.category, image_size=args.size, num_workers=0, val_source="none")
    dm.setup("fit")
    model = PatchCoreModel(coreset_ratio=args.ratio, progress=False, **extra)
    if args.norm == "imagenet":
        model.backbone.mean.copy_(torch.tensor(IMAGENET[0]).view(1, 3, 1, 1))
        model.backbone.std.copy_(torch.tensor(IMAGENET[1]).view(1, 3, 1, 1))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in dm.train_dataloader():
            model.update(batch["image"])
        t1 = time.perf_counter()
        model.fit()
        t2 = time.perf_counter()
        out = [(*model(b["image"]), b["label"], b["mask"][:, 0]) for b in dm.test_dataloader()]
        t3 = time.perf_counter()
    scores, maps, labels, masks = (torch.cat(x) for x in zip(*out, strict=True))
    print(
        json.dumps(
            {
                "category": args.category,
                "size": args.size,
                "ratio": args.ratio,
                "norm": args.norm,
                "set": args.set,
                "image_AUROC": round(image_auroc(scores, labels), 4),
                "pixel_AUROC": round(pixel_auroc(maps, masks), 4),
                "embed_s": round(t1 - t0, 1),
                "coreset_s": round(t2 - t1, 1),
                "test_s": round(t3 - t2, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
