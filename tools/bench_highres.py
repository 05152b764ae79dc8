"""High-resolution PatchCore: fit and test on synthetic images of a given size, recording time and memory.

    python tools/bench_highres.py --size 1024 --n-train 200 --ratio 0.01 --out docs/bench/highres.json
    python tools/bench_highres.py --config configs/patchcore/bottle.yaml --size 1024 --n-train 200 \\
        --ratio 0.01 --val-source test_split --out docs/bench/highres_wrn50_1024.json --model.pretrained false

Generates a synthetic MVTec-layout category at the given size (cached under --data-root), runs ``adx fit``
with the config (default: the lite0 demo config; the second command is the paper's WideResNet-50 with
embed_dim 1024, random weights, which is enough to measure memory) and records wall time, the time and
peak RSS of each phase (features, coreset + bank, validation and test) and the metrics. Arguments the
script does not know (``--model.pretrained false``) go to ``adx fit``. ``--val-source test_split`` keeps
all ``--n-train`` images for the memory bank (thresholds from 10 % of the test images).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from adx.cli import main as adx_main
from adx.models.patchcore.torch_model import PatchCoreModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "patchcore"


def _peak_rss_mb() -> int:
    """Peak resident memory of this process so far, MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _time_fit(phases: dict[str, Any], t0: float) -> None:
    """Wrap PatchCoreModel.fit to record the pool size, the time and the peak RSS before and after it."""
    fit = PatchCoreModel.fit

    def timed(self: PatchCoreModel) -> None:
        pool = self._pool
        phases["pool_images"] = len(pool.sizes) if pool is not None else 0
        phases["pool_patches"] = len(pool) if pool is not None else 0
        phases["pool_on_disk"] = bool(pool is not None and pool.on_disk)
        phases["embed_dim"] = int(self.memory_bank.shape[1])
        phases["features_s"] = round(time.perf_counter() - t0, 1)  # start-up included
        phases["peak_rss_features_mb"] = _peak_rss_mb()
        start = time.perf_counter()
        fit(self)
        phases["coreset_and_bank_s"] = round(time.perf_counter() - start, 1)
        phases["bank_size"] = len(self.memory_bank)
        phases["peak_rss_after_coreset_mb"] = _peak_rss_mb()

    PatchCoreModel.fit = timed  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(CONFIGS / "demo.yaml"))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--val-source", default="train_split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-root", default="/tmp/adx_highres_data")
    parser.add_argument("--runs", default="/tmp/adx_highres_runs")
    parser.add_argument("--out", required=True)
    args, extra = parser.parse_known_args()
    command = " ".join(sys.argv)  # adx's CLI rewrites sys.argv
    phases: dict[str, Any] = {}
    t0 = time.perf_counter()
    _time_fit(phases, t0)
    adx_main(
        [
            "fit",
            "--config",
            args.config,
            "--data",
            "adx.data.Synthetic",
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
            "--data.val_source",
            args.val_source,
            "--data.batch_size",
            str(args.batch_size),
            "--data.eval_batch_size",
            "4",
            "--model.coreset_ratio",
            str(args.ratio),
            "--root_dir",
            args.runs,
            "--heatmaps.max_images",
            "4",
            *extra,
        ]
    )
    seconds = time.perf_counter() - t0
    report = json.loads(
        sorted(Path(args.runs).rglob("metrics.json"), key=lambda p: p.stat().st_mtime)[-1].read_text()
    )
    record = {
        "command": command,
        "config": Path(args.config).name,
        "size": args.size,
        "n_train": args.n_train,
        "val_source": args.val_source,
        "coreset_ratio": args.ratio,
        **phases,
        "test_s": report.get("test_seconds"),
        "fit_and_test_s": round(seconds, 1),
        "peak_rss_mb": _peak_rss_mb(),
        "metrics": report["metrics"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
