"""Seconds per EfficientAD-S training step, adx and anomalib (the peer) on the same random inputs.

    OMP_NUM_THREADS=1 python tools/efficientad_step.py --peer <anomalib venv>/bin/python \
        --out docs/bench/efficientad_step_vs_peer.json

One step = the method's losses on one training image (batch 1, the paper's) and one penalty image, at
``--image-size``, backward, and Adam on student and autoencoder; teacher frozen, random weights (the cost
does not depend on them), the paper's paddings on both sides. adx's step also draws its penalty image
and colour augmentation (its own sources); the peer's is given a random penalty tensor. adx is timed
twice: as in its first epoch, and as in later ones (``adx_cached``), where the teacher's maps of the
training image come from the frozen-feature cache. The mean of
``--repeats`` steps after one warm-up step; the peer runs the same steps in its own environment right
after. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

PEER = """
import json, sys, time, torch
from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel
size, repeats = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
m = EfficientAdModel(teacher_out_channels=384, model_size="small", padding=True)
m.train(); m.teacher.eval(); m.teacher.requires_grad_(False)
opt = torch.optim.Adam(list(m.student.parameters()) + list(m.ae.parameters()), lr=1e-4)
x, penalty = torch.rand(1, 3, size, size), torch.rand(1, 3, size, size)
def step():
    opt.zero_grad(); sum(m(x, penalty)).backward(); opt.step()
step()
t0 = time.perf_counter()
for _ in range(repeats): step()
print(json.dumps({"seconds_per_step": (time.perf_counter() - t0) / repeats, "threads": torch.get_num_threads()}))
"""


def adx_step(size: int, repeats: int, cached: bool) -> dict:
    from adx.models.efficient_ad.torch_model import EfficientAdModel

    torch.manual_seed(0)
    model = EfficientAdModel(pretrained=False)
    model.train()
    model.penalty_source((size, size))
    params = [*model.student.parameters(), *model.autoencoder.parameters()]
    opt = torch.optim.Adam(params, lr=1e-4)
    batch = {"image": torch.rand(1, 3, size, size), "path": ["probe.png"]}
    if cached:  # epochs after the first read the teacher's maps of the image from the frozen-feature cache
        with torch.no_grad():
            batch["features"] = model.frozen_features(batch["image"])

    def step() -> None:
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return {"seconds_per_step": (time.perf_counter() - t0) / repeats, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer", help="python of a venv with anomalib")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    record = {"command": "python " + " ".join(sys.argv), "image_size": args.image_size, "batch": 1}
    record["adx"] = adx_step(args.image_size, args.repeats, cached=False)
    record["adx_cached"] = adx_step(args.image_size, args.repeats, cached=True)
    if args.peer:
        env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(torch.get_num_threads())}
        out = subprocess.run(
            [args.peer, "-c", PEER, str(args.image_size), str(args.repeats)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        record["peer"] = json.loads(out.strip().splitlines()[-1])
        peer = record["peer"]["seconds_per_step"]
        record["train_throughput_ratio"] = round(peer / record["adx"]["seconds_per_step"], 2)
        record["train_throughput_ratio_cached"] = round(peer / record["adx_cached"]["seconds_per_step"], 2)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
