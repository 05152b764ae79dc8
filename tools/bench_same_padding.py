"""TensorFlow "SAME" padding with and without a padded copy of the input, side by side in one run.

    OMP_NUM_THREADS=1 python tools/bench_same_padding.py --out docs/bench/same_padding.json

adx's backbones replace timm's ``Conv2dSame`` (pads the input, then convolves) by ``StaticSameConv2d`` (the
extra zero goes into the kernel; bit-identical outputs). This times both on the same network and inputs,
alternating rounds so that both see the same machine: a frozen ``tf_efficientnet_lite0`` (BatchNorm folded,
channels-last) scoring a batch as PatchCore and PaDiM extract features, and a trainable one taking a training
step (forward, backward, SGD) as STFPM's student does. Random weights (the cost does not depend on them). The
median of ``--rounds`` rounds after a warm-up. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from timm.layers import Conv2dSame
from torch import nn

from adx.models.components.backbone import Backbone
from adx.models.components.extractor import StaticSameConv2d, swap_layer_class


def with_timm_padding(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` whose StaticSameConv2d layers are timm's Conv2dSame again (same parameters)."""
    model = copy.deepcopy(model)
    return model, swap_layer_class(model, StaticSameConv2d, Conv2dSame)


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def frozen_case(size: int, batch: int) -> tuple[nn.Module, Callable[[nn.Module], Callable[[], None]]]:
    net = Backbone("tf_efficientnet_lite0", (8, 16), pretrained=False)
    x = torch.rand(batch, 3, size, size)

    def runner(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(x)

        return run

    return net, runner


def training_case(size: int, batch: int) -> tuple[nn.Module, Callable[[nn.Module], Callable[[], None]]]:
    net = Backbone("tf_efficientnet_lite0", (4, 8, 16), pretrained=False, trainable=True).train()
    x = torch.rand(batch, 3, size, size)

    def runner(model: nn.Module) -> Callable[[], None]:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every round runs the same weights

        def run() -> None:
            opt.zero_grad()
            sum(f.pow(2).mean() for f in model(x)).backward()
            opt.step()

        return run

    return net, runner


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="backbone .* uses RANDOM weights")
    torch.manual_seed(0)
    cases = {
        "frozen lite0, strides 8 / 16, batch 16, no gradient (PatchCore / PaDiM features)": frozen_case(
            args.image_size, 16
        ),
        "trainable lite0, strides 4 / 8 / 16, batch 32, forward + backward + SGD (STFPM's student)": (
            training_case(args.image_size, 32)
        ),
    }
    rows = []
    for label, (net, runner) in cases.items():
        timm_net, swapped = with_timm_padding(net)
        fast, slow = runner(net), runner(timm_net)
        fast(), slow()  # warm-up
        fast_s, slow_s = [], []
        for _ in range(args.rounds):  # alternate, so both see the same machine
            slow_s.append(_timed(slow))
            fast_s.append(_timed(fast))
        row = {
            "case": label,
            "layers_swapped": swapped,
            "timm_seconds": round(statistics.median(slow_s), 4),
            "adx_seconds": round(statistics.median(fast_s), 4),
        }
        row["speedup"] = round(row["timm_seconds"] / row["adx_seconds"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {
        "command": "python " + " ".join(sys.argv),
        "image_size": args.image_size,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
