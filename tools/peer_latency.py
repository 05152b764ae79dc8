"""Pure-model latency of anomalib's (the peer's) EfficientAD torch model, for docs/benchmarks.md; run with the
peer venv's python.

    <peer-venv>/bin/python tools/peer_latency.py OUT.json --size S --image-size 256 --batch 1 --padding 1

Random weights (latency does not depend on them) with the channel statistics and map quantiles set to
non-zero values so the peer takes its inference path with normalisation; the model in eval mode under
``torch.inference_mode``; one warm-up call, then ``--rounds`` rounds of ``--repeats`` calls; the median
round is reported as milliseconds per call. Threads: torch's default unless OMP_NUM_THREADS is set.
This file is a tool run inside the peer's environment; adx itself never imports anomalib.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel, EfficientAdModelSize


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out")
    parser.add_argument("--size", choices=["S", "M"], default="S")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--padding", type=int, default=1, help="1: padded PDN (adx's default), 0: the peer's default"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = EfficientAdModel(model_size=EfficientAdModelSize[args.size], padding=bool(args.padding)).eval()
    with torch.no_grad():
        model.mean_std["std"].fill_(1.0)
        for name in ("qa_st", "qa_ae"):
            model.quantiles[name].fill_(0.1)
        for name in ("qb_st", "qb_ae"):
            model.quantiles[name].fill_(1.0)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size)
    rounds = []
    with torch.inference_mode():
        model(x)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                model(x)
            rounds.append(1000 * (time.perf_counter() - t0) / args.repeats)
    record = {
        "peer": "anomalib",
        "model": f"EfficientAd-{args.size}",
        "padding": bool(args.padding),
        "image_size": args.image_size,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "ms_per_call_rounds": [round(r, 1) for r in rounds],
        "ms_per_call": round(statistics.median(rounds), 1),
    }
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
