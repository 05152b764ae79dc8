"""Pure-model latency and throughput of exported bundles: torch vs ONNX Runtime vs OpenVINO, side by side.

    python tools/bench_runtime.py --ckpt RUN_A/checkpoints/last.ckpt --ckpt RUN_B/checkpoints/last.ckpt \
        --batches 1 16 --rounds 5 --out docs/bench/runtime_cpu.json

For each checkpoint: the fitted model's inference module in torch (eager, ``torch.no_grad``), and the ONNX
and OpenVINO bundles that ``adx export`` writes (exported into a temporary folder with the same code),
run through ``adx.deploy.Inferencer.run`` on the same random batch at the model's input size (so the
in-graph resize is the identity, as for images already at size; decoding is not timed). Per batch size,
the runtimes take turns round by round (so drift in machine load hits all of them alike); each round
times ``--repeats`` calls after one warm-up call. Latency = median ms per call; throughput = images per
second at that median. Threads: each runtime's default unless ``--threads`` is given (then all get it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adx.deploy import Inferencer
from adx.deploy_cli import load_model
from adx.export import export

RUNTIMES = ("torch", "onnxruntime", "openvino")


def _runners(ckpt: Path, tmp: Path, threads: int | None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    model = load_model(ckpt)
    module = model.inference_module().eval()
    onnx = export(model, tmp / "onnx", "onnx", ckpt_path=ckpt)
    vino = export(model, tmp / "openvino", "openvino", ckpt_path=ckpt)
    ort_inf = Inferencer(onnx, runtime="onnxruntime", threads=threads)
    ov_inf = Inferencer(vino, runtime="openvino", threads=threads)

    def run_torch(batch: np.ndarray) -> None:
        with torch.no_grad():
            module(torch.from_numpy(batch))

    runners = {"torch": run_torch, "onnxruntime": ort_inf.run, "openvino": ov_inf.run}
    facts = {
        "method": type(model).__name__,
        "input_size": [int(v) for v in model.input_size],
        "backbone": getattr(model.model.backbone, "name", None),
        "bank_rows": int(len(model.model.memory_bank)) if hasattr(model.model, "memory_bank") else None,
        "onnx_mb": round((onnx / "model.onnx").stat().st_size / 1e6, 1),
    }
    return model, runners, facts


def _time(run: Any, batch: np.ndarray, repeats: int) -> list[float]:
    run(batch)  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(batch)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def bench(ckpt: Path, batches: list[int], rounds: int, repeats: int, threads: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="adx_bench_runtime_") as tmp:
        model, runners, facts = _runners(ckpt, Path(tmp), threads)
        h, w = facts["input_size"]
        rng = np.random.default_rng(0)
        result: dict[str, Any] = {"checkpoint": str(ckpt), **facts, "batches": {}}
        for b in batches:
            batch = rng.random((b, 3, h, w), dtype=np.float32)
            times: dict[str, list[float]] = {r: [] for r in RUNTIMES}
            for _ in range(rounds):
                for name in RUNTIMES:
                    times[name] += _time(runners[name], batch, repeats)
            per = {}
            for name in RUNTIMES:
                ms = statistics.median(times[name])
                per[name] = {
                    "median_ms": round(ms, 2),
                    "p90_ms": round(float(np.percentile(times[name], 90)), 2),
                    "images_per_s": round(b * 1000 / ms, 2),
                    "calls": len(times[name]),
                }
            base = per["torch"]["median_ms"]
            for name in RUNTIMES:
                per[name]["speedup_vs_torch"] = round(base / per[name]["median_ms"], 2)
            result["batches"][str(b)] = per
            print(
                json.dumps(
                    {"method": facts["method"], "batch": b, **{k: v["median_ms"] for k, v in per.items()}}
                )
            )
        del model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", action="append", required=True, help="a checkpoint written by adx fit")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4, help="timed calls per runtime per round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime
    import openvino

    report = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_before": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__,
        },
        "how": __doc__.split("\n\n", 2)[2].strip(),
        "models": [bench(Path(c), args.batches, args.rounds, args.repeats, args.threads) for c in args.ckpt],
    }
    report["machine"]["load_average_after"] = round(os.getloadavg()[0], 2)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
