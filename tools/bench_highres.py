"""High-resolution PatchCore: fit at 1024x1024 on 200 synthetic training images (1 % coreset).

    python tools/bench_highres.py --size 1024 --n-train 200 --ratio 0.01 --out docs/bench/highres.json

Generates a synthetic MVTec-layout category at the given size (cached under --data-root), runs
``adx fit`` through the CLI and records wall time, peak RSS and the metrics.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from adx.cli import main as adx_main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--data-root", default="/tmp/adx_highres_data")
    parser.add_argument("--runs", default="/tmp/adx_highres_runs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    command = " ".join(sys.argv)  # adx's CLI rewrites sys.argv
    t0 = time.perf_counter()
    adx_main(
        [
            "fit",
            "--config",
            str(Path(__file__).resolve().parents[1] / "configs" / "patchcore" / "demo.yaml"),
            "--data.root",
            f"{args.data_root}/s{args.size}",
            "--data.size",
            str(args.size),
            "--data.image_size",
            str(args.size),
            "--data.n_train",
            str(args.n_train),
            "--data.n_test_good",
            "10",
            "--data.n_test_bad",
            "10",
            "--data.batch_size",
            "8",
            "--data.eval_batch_size",
            "4",
            "--model.coreset_ratio",
            str(args.ratio),
            "--root_dir",
            args.runs,
            "--heatmaps.max_images",
            "4",
        ]
    )
    seconds = time.perf_counter() - t0
    report = json.loads(
        sorted(Path(args.runs).rglob("metrics.json"), key=lambda p: p.stat().st_mtime)[-1].read_text()
    )
    record = {
        "command": command,
        "size": args.size,
        "n_train": args.n_train,
        "coreset_ratio": args.ratio,
        "fit_and_test_s": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "metrics": report["metrics"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
