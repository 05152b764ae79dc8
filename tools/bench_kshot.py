"""Few-shot PatchCore grid: ``adx fit`` at k = 1, 2, 4, 8 normal images x data seeds, one category per call.

    python tools/bench_kshot.py --root ../shared/data/mvtec_ad --category screw \
        --k 1 2 4 8 --seeds 0 1 2 --set model.coreset_ratio=1.0 --out docs/bench/kshot_screw.json

Each run is
    adx fit --config configs/patchcore/offline.yaml --data.root ROOT --data.category CAT --data.k_shot K \
        --data.val_source test_split --data.seed S --heatmaps.enabled false [--set ...]
in its own run folder under --root_dir (the K images are listed in its k_shot.txt, copied into the record).
The JSON file holds one record per run (k, seed, metrics, command, the K image names) and a summary per k:
mean and spread (min, max, population std) over the seeds. Runs already in --out with the same k, seed and
options are skipped, so an interrupted grid resumes.

    python tools/bench_kshot.py table docs/bench/kshot_*.json     # the markdown table of docs/kshot.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METRICS = ("image_AUROC", "pixel_AUROC", "AUPRO", "image_F1max")


def _doc_path(path: str) -> str:
    return re.sub(r"^/work/shared/data", "../shared/data", str(path))


def run_one(args: argparse.Namespace, k: int, seed: int) -> dict[str, Any]:
    argv = [
        "adx",
        "fit",
        "--config",
        args.config,
        "--data.root",
        args.root,
        "--data.category",
        args.category,
        "--data.k_shot",
        str(k),
        "--data.val_source",
        "test_split",
        "--data.seed",
        str(seed),
        "--heatmaps.enabled",
        "false",
    ]
    argv += [f"--{kv.split('=', 1)[0]}={kv.split('=', 1)[1]}" for kv in args.set]
    extra = ["--root_dir", args.root_dir, "--trainer.enable_progress_bar", "false"]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    proc = subprocess.run(argv + extra, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    found = re.findall(r"adx: results in (\S+)", proc.stderr)
    if proc.returncode or not found:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"adx fit failed ({proc.returncode}) at k={k} seed={seed}")
    run_dir = Path(found[-1])
    report = json.loads((run_dir / "metrics.json").read_text())
    shots = [Path(p).name for p in (run_dir / "k_shot.txt").read_text().split()]
    prefix = f"OMP_NUM_THREADS={args.threads} " if args.threads else ""
    return {
        "method": "PatchCore",
        "dataset": Path(args.root).name,
        "category": args.category,
        "k": k,
        "seed": seed,
        "options": dict(kv.split("=", 1) for kv in args.set),
        **{m: round(float(report["metrics"][m]), 4) for m in METRICS if m in report["metrics"]},
        "n_test": report.get("n_test"),
        "n_anomalous": report.get("n_anomalous"),
        "memory_bank": _bank_size(run_dir),
        "k_shot_images": shots,
        "command": prefix + " ".join(shlex.quote(_doc_path(a)) for a in argv),
        "wall_s": round(wall, 1),
        "run_dir": str(run_dir),
        "date": datetime.date.today().isoformat(),
    }


def _bank_size(run_dir: Path) -> int | None:
    """Rows of the PatchCore memory bank in the run's checkpoint."""
    import torch

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return None
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return next((int(v.shape[0]) for k, v in state.items() if k.endswith("memory_bank")), None)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, min, max and population std over seeds, per (options, k)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(json.dumps([r["options"], r["k"]], sort_keys=True), []).append(r)
    out = []
    for key in sorted(
        groups, key=lambda g: (json.loads(g)[0].get("model.coreset_ratio", ""), json.loads(g)[1])
    ):
        rs = groups[key]
        row: dict[str, Any] = {
            "k": rs[0]["k"],
            "options": rs[0]["options"],
            "seeds": sorted(r["seed"] for r in rs),
        }
        for m in METRICS:
            vals = [r[m] for r in rs if m in r]
            if vals:
                row[m] = {
                    "mean": round(statistics.fmean(vals), 4),
                    "min": min(vals),
                    "max": max(vals),
                    "std": round(statistics.pstdev(vals), 4),
                }
        out.append(row)
    return out


HEADER = ["category", "coreset ratio", "k", "seeds", "image AUROC", "pixel AUROC", "AUPRO", "memory bank"]


def rows(doc: dict[str, Any]) -> list[list[str]]:
    """Table cells per options x k of one category's record: mean ± std (min-max) over the seeds."""
    out = []
    category = doc["runs"][0]["category"]
    for row in doc["summary"]:
        banks = [
            r["memory_bank"] for r in doc["runs"] if r["k"] == row["k"] and r["options"] == row["options"]
        ]
        cells = []
        for m in ("image_AUROC", "pixel_AUROC", "AUPRO"):
            v = row[m]
            cells.append(
                f"{v['mean']:.3f}"
                if len(row["seeds"]) == 1
                else f"{v['mean']:.3f} ± {v['std']:.3f} ({v['min']:.3f}-{v['max']:.3f})"
            )
        ratio = row["options"].get("model.coreset_ratio", "0.1 (config)")
        bank = f"{min(banks)}" if min(banks) == max(banks) else f"{min(banks)}-{max(banks)}"
        out.append([category, str(ratio), str(row["k"]), str(len(row["seeds"])), *cells, bank])
    return out


def table(paths: list[str]) -> str:
    """Markdown table of the records at ``paths`` (docs/benchmarks.md generates the same)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for path in paths:
        lines += ["| " + " | ".join(r) + " |" for r in rows(json.loads(Path(path).read_text()))]
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["table"]:
        print(table(sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--config", default="configs/patchcore/offline.yaml")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--set", action="append", default=[], help="extra adx option=value, e.g. model.coreset_ratio=1.0"
    )
    parser.add_argument("--root_dir", default="/tmp/adx_kshot_runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    options = dict(kv.split("=", 1) for kv in args.set)
    for k in args.k:
        for seed in args.seeds:
            if any(r["k"] == k and r["seed"] == seed and r["options"] == options for r in doc["runs"]):
                continue
            rec = run_one(args, k, seed)
            print(
                json.dumps({m: rec.get(m) for m in ("category", "k", "seed", *METRICS, "wall_s")}), flush=True
            )
            doc["runs"].append(rec)
            doc["summary"] = summarise(doc["runs"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
