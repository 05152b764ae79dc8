"""Where a trained method's training step spends its time: backbone, flows on cached features, loading.

    python tools/probe_train_step.py --root ../shared/data/mvtec_ad --category screw \
        --out docs/bench/train_step_probe.json

For FastFlow and CFlow (ResNet18 architecture, random weights: the cost does not depend on them), one batch
of ``--batch-size`` random images at ``--image-size``: the backbone's forward, and the loss's forward,
backward and Adam step on the cached features in float32 and under CPU bfloat16 autocast (what
``--trainer.precision bf16-mixed`` runs); plus loading ``--batch-size`` images of the category through the
data module. Each figure is the mean of ``--repeats`` calls after one warm-up call. The ceiling of the
frozen-feature cache's speed-up of an epoch is (backbone + step) / step. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from adx.data import MVTec
from adx.models import MODELS


def _seconds(call: Callable[[], object], repeats: int) -> float:
    call()
    t0 = time.perf_counter()
    for _ in range(repeats):
        call()
    return round((time.perf_counter() - t0) / repeats, 3)


def probe(name: str, images: torch.Tensor, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MODELS[name](backbone="resnet18", pretrained=False).model
    with torch.no_grad():
        backbone = _seconds(lambda: model.frozen_features(images), repeats)
        batch = {"image": images, "features": model.frozen_features(images)}
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)

    def step(bf16: bool) -> None:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(batch)
        loss.backward()
        optimizer.step()

    fp32, bf16 = _seconds(lambda: step(False), repeats), _seconds(lambda: step(True), repeats)
    return {
        "backbone_forward_s": backbone,
        "step_on_cached_features_fp32_s": fp32,
        "step_on_cached_features_bf16_autocast_s": bf16,
        "cache_ceiling": round((backbone + fp32) / fp32, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    record: dict[str, object] = {
        "command": "python " + " ".join(sys.argv),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
    }
    for name in ("FastFlow", "CFlow"):
        record[name] = probe(name, images, args.repeats)
        print(name, record[name], flush=True)
    dm = MVTec(root=args.root, category=args.category, image_size=args.image_size, batch_size=args.batch_size)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    record["load_batch_s"] = _seconds(lambda: next(loader), args.repeats)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
