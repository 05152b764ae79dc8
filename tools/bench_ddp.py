"""One process against two: the same ``adx fit`` on CPU with Lightning's ddp strategy (gloo), compared.

    python tools/bench_ddp.py ../shared/data/mvtec_ad screw --image-size 256 --out docs/bench/ddp_padim_screw.json

Runs ``adx fit --config configs/<model>/offline.yaml`` (fit, calibration on the held-out normal images,
test) as a user would, each in a subprocess: alone and with ``--trainer.devices 2 --trainer.strategy
ddp --trainer.accelerator cpu``, and alone with one torch thread (what Lightning gives each of two
processes on a 2-core machine), ``--rounds`` times each in alternating order. Records the wall time of
each command (imports and the ddp launch included), the largest difference of every fitted tensor
(PaDiM's mean / inv_cov, PatchCore's memory bank) and of the calibration between the first round's two
checkpoints, both runs' metrics, and whether the 2-process run left one run folder with each test
image once.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FITTED = {"padim": ("model.mean", "model.inv_cov"), "patchcore": ("model.memory_bank",)}
TWO = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


def run(args: list[str], log: Path, threads: int | None = None) -> float:
    """Run ``python -m adx.cli ARGS`` (output to ``log``, ``threads`` torch threads); return its wall seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "ADX_RUN_DIR")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(
            [sys.executable, "-m", "adx.cli", *args], stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"adx failed (exit {done.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return seconds


def differences(one: dict, two: dict, keys: tuple[str, ...]) -> dict:
    """max |a - b| and that over max |a| for each key (fitted tensors and calibration buffers)."""
    out = {}
    for key in keys:
        a, b = one[key].double(), two[key].double()
        if a.shape != b.shape:
            out[key] = {"shape_1": list(a.shape), "shape_2": list(b.shape)}
            continue
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        scale = float(a.abs().max()) if a.numel() else 0.0
        out[key] = {
            "shape": list(a.shape),
            "max_abs_diff": diff,
            "max_rel_diff": diff / scale if scale else diff,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="MVTec-layout root folder")
    parser.add_argument("category")
    parser.add_argument("--model", default="padim", choices=sorted(FITTED))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, in alternating order")
    parser.add_argument("--workdir", type=Path, default=None, help="run folders (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="adx_bench_ddp_"))
    work.mkdir(parents=True, exist_ok=True)
    common = [
        "fit",
        "--config",
        str(ROOT / "configs" / args.model / "offline.yaml"),
        "--data.root",
        str(Path(args.root).resolve()),
        "--data.category",
        args.category,
        "--data.image_size",
        str(args.image_size),
        "--trainer.enable_progress_bar",
        "false",
        "--heatmaps.enabled",
        "false",
    ]
    # "1": one process as configured; "2": two processes; "1t": one process with one torch thread, as
    # Lightning gives each of the two processes on this machine (cpu_count // processes)
    commands = {"1": common, "2": [*common, *TWO], "1t": common}
    threads = {"1": None, "2": None, "1t": 1}
    seconds: dict[str, list[float]] = {n: [] for n in commands}
    runs: dict[str, Path] = {}
    for r in range(args.rounds):  # alternate the order: the machine's load drifts
        for n in list(commands) if r % 2 == 0 else list(commands)[::-1]:
            root = work / f"r{r}_{n}"
            print(f"adx {' '.join(commands[n])} --root_dir {root}", file=sys.stderr)
            log = work / f"log_r{r}_{n}.txt"
            seconds[n].append(run([*commands[n], "--root_dir", str(root)], log, threads[n]))
            folders = sorted(root.glob(f"{args.model}/*/*/v*"))
            if len(folders) != 1:
                sys.exit(f"expected one run folder for the {n}-process run, found {folders}")
            runs.setdefault(n, folders[0])  # the first round's runs are compared
            print(f"  {n}: {seconds[n][-1]:.1f} s -> {folders[0]}", file=sys.stderr)
    states = {
        n: torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        for n, r in runs.items()
    }
    calibration = tuple(
        k for k, v in states["1"].items() if k.startswith("calibrator.") and torch.is_tensor(v)
    )
    reports = {n: json.loads((r / "metrics.json").read_text()) for n, r in runs.items()}
    rows = {n: [row["path"] for row in csv.DictReader((r / "scores.csv").open())] for n, r in runs.items()}
    out = {
        "model": args.model,
        "data": {"root": args.root, "category": args.category, "image_size": args.image_size},
        "commands": {
            n: ("OMP_NUM_THREADS=1 " if threads[n] else "") + "adx " + " ".join(c) + " --root_dir $WORK"
            for n, c in commands.items()
        },
        "seconds": {n: [round(x, 1) for x in s] for n, s in seconds.items()},
        "median_ratio_2_over_1": round(statistics.median(seconds["2"]) / statistics.median(seconds["1"]), 2),
        "median_ratio_2_over_1t": round(
            statistics.median(seconds["2"]) / statistics.median(seconds["1t"]), 2
        ),
        "note": "wall seconds of the whole command (imports, ddp launch, fit, validation, test), rounds in "
        "alternating order. Under ddp Lightning gives each process cpu_count // processes torch threads (1 "
        "here); '1' keeps torch's default (all cores), '1t' is one process with one thread. The machine was "
        "shared with other jobs (load_average_at_end).",
        "fitted": differences(states["1"], states["2"], FITTED[args.model]),
        "calibration": differences(states["1"], states["2"], calibration),
        "metrics": {n: r["metrics"] for n, r in reports.items()},
        "metrics_equal_1_2": reports["1"]["metrics"] == reports["2"]["metrics"],
        "n_test": {n: r["n_test"] for n, r in reports.items()},
        "processes": {n: r.get("processes") for n, r in reports.items()},
        "same_test_rows_in_same_order": rows["1"] == rows["2"],
        "duplicate_test_rows_2": len(rows["2"]) - len(set(rows["2"])),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
