"""Tiled against resized: PatchCore and FastFlow at native resolution in tiles vs the config's default size.

    python tools/bench_tiling.py --list                       # the runs and their exact commands
    python tools/bench_tiling.py patchcore_screw_resized patchcore_screw_tiled ...   # run them, one by one
    python tools/bench_tiling.py --all                        # every run (about 2 hours on 2 cores)
    python tools/bench_tiling.py --table                      # the Markdown table of docs/tiling.md

Each run is one ``adx fit`` process (fit, then its test on the test split; heatmap panels off, so test
time is the model's and the metrics'), started by this script, which records: image AUROC, pixel AUROC and
AUPRO (FPR 0.3) from the run's ``metrics.json``; fit seconds (config.yaml written at fit start ->
last.ckpt written after fit and calibration); test seconds and images/s (the test loop, from
``metrics.json``); the whole command's wall time; the command's peak RSS (``os.wait4`` on the child); the
load average before and after (the machine may be shared: timings then vary, quality does not).
The record goes to ``docs/bench/tiling_<run>.json`` with the exact command.

Choices (see ``RUNS``; docs/tiling.md explains them):

- screw here is MVTec AD screw downscaled to 320 x 320 (../shared/data README), so its native size is
  320: the tiled runs use a 320 canvas cut into 192 px tiles at stride 128 (2 x 2 = 4 tiles).
- Magnetic Tile images vary from 103 to 632 px wide and 222 to 403 px high; the tiled runs use a
  384 x 512 canvas (no image shrunk by more than 1.25x) cut into 256 px tiles at stride 192 (2 x 3 = 6).
- PatchCore: the offline config (320 px, 10 % coreset on screw; 1 % on Magnetic Tile as in
  docs/benchmarks.md, where 10 % took too long). Tiled runs scale the coreset ratio so that the memory
  bank keeps the resized run's number of rows (same memory and kNN cost per patch): 10 % x 460,800 /
  663,552 = 6.94 % on screw, 1 % x 576,000 / 2,211,840 = 0.26 % on Magnetic Tile.
- FastFlow: the offline config (256 px, batch 16) for 5 epochs in every run; a tiled epoch sees every
  tile, so it takes that many more steps (4x on screw, 6x on Magnetic Tile). A control run trains
  FastFlow on whole screw images at the native 320 px, to separate the resolution from the tiles.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
OUT = REPO / "docs" / "bench"
QUIET = ["--trainer.enable_progress_bar", "false", "--heatmaps.enabled", "false"]

SCREW = ["--data.root", "../shared/data/mvtec_ad", "--data.category", "screw"]
MAGNETIC = ["--data.root", "../shared/data/magnetic_tile", "--data.category", "magnetic_tile"]
SCREW_TILES = ["--data.image_size", "320", "--data.tile_size", "192", "--data.tile_stride", "128"]
MAGNETIC_TILES = ["--data.image_size", "[384,512]", "--data.tile_size", "256", "--data.tile_stride", "192"]
PATCHCORE = ["--config", "configs/patchcore/offline.yaml"]
FASTFLOW = ["--config", "configs/fastflow/offline.yaml"]
EPOCHS_5 = ["--trainer.max_epochs", "5"]

RUNS: dict[str, dict] = {
    "patchcore_screw_resized": {
        "args": [*PATCHCORE, *SCREW],
        "notes": "offline config: 320 px (the native size of this downscaled screw), 10 % coreset",
    },
    "patchcore_screw_tiled": {
        "args": [*PATCHCORE, *SCREW, *SCREW_TILES, "--model.coreset_ratio", "0.0694"],
        "notes": "320 canvas, 4 tiles of 192 at stride 128; coreset 6.94 % = the resized run's bank size",
    },
    "patchcore_magnetic_tile_resized": {
        "args": [*PATCHCORE, *MAGNETIC, "--model.coreset_ratio", "0.01"],
        "notes": "offline config at 320x320, 1 % coreset (as in docs/benchmarks.md)",
    },
    "patchcore_magnetic_tile_tiled": {
        "args": [*PATCHCORE, *MAGNETIC, *MAGNETIC_TILES, "--model.coreset_ratio", "0.0026"],
        "notes": "384x512 canvas, 6 tiles of 256 at stride 192; coreset 0.26 % = the resized run's bank size",
    },
    "fastflow_screw_resized": {
        "args": [*FASTFLOW, *EPOCHS_5, *SCREW],
        "notes": "offline config (256 px, batch 16), 5 epochs",
    },
    "fastflow_screw_resized_320": {
        "args": [*FASTFLOW, *EPOCHS_5, *SCREW, "--data.image_size", "320"],
        "notes": "control: whole images at the native 320 px (no tiles), batch 16, 5 epochs",
    },
    "fastflow_screw_tiled": {
        "args": [*FASTFLOW, *EPOCHS_5, *SCREW, *SCREW_TILES],
        "notes": "320 canvas, 4 tiles of 192 at stride 128, batch 16 tiles, 5 epochs (4x the steps)",
    },
    "fastflow_magnetic_tile_resized": {
        "args": [*FASTFLOW, *EPOCHS_5, *MAGNETIC],
        "notes": "offline config (256x256, batch 16), 5 epochs",
    },
    "fastflow_magnetic_tile_tiled": {
        "args": [*FASTFLOW, *EPOCHS_5, *MAGNETIC, *MAGNETIC_TILES],
        "notes": "384x512 canvas, 6 tiles of 256 at stride 192, batch 16 tiles, 5 epochs (6x the steps)",
    },
}


def command(name: str, root_dir: Path) -> list[str]:
    """The ``adx fit`` command line of run ``name``, writing its run folder under ``root_dir``."""
    return ["adx", "fit", *RUNS[name]["args"], *QUIET, "--root_dir", str(root_dir)]


def run(name: str, root_dir: Path, out_dir: Path) -> dict:
    """Run ``name`` as its own process and write ``out_dir/tiling_<name>.json``; return the record."""
    cmd = command(name, root_dir / name)
    load_before = os.getloadavg()
    started = time.time()
    print(f"[bench_tiling] {name}: {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"[bench_tiling] {name} failed with exit code {code}")
    (run_dir,) = sorted((root_dir / name).glob("*/*/*/v*"), key=lambda p: p.stat().st_mtime)[-1:]
    report = json.loads((run_dir / "metrics.json").read_text())
    fit_s = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime - (
        run_dir / "config.yaml"
    ).stat().st_mtime
    metrics = report["metrics"]
    record = {
        "run": name,
        "command": shlex.join(command(name, Path("/tmp/adx_tiling_runs") / name)),
        "notes": RUNS[name]["notes"],
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores, torch default threads, no GPU",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "image_size": report["data"]["image_size"],
        "tiling": report["data"].get("tiling"),
        "image_AUROC": round(metrics["image_AUROC"], 4),
        "pixel_AUROC": round(metrics["pixel_AUROC"], 4),
        "AUPRO": round(metrics["AUPRO"], 4),
        "fit_s": round(fit_s, 1),
        "test_s": round(report["test_seconds"], 1),
        "test_images": report["n_test"],
        "test_img_per_s": round(report["test_images_per_second"], 2),
        "whole_command_s": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "metrics": metrics,
        "calibration": report.get("calibration"),
        "hparams": report.get("hparams"),
        "weights": report.get("weights"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"tiling_{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[bench_tiling] {name}: wrote {path}", flush=True)
    return record


def _size(record: dict) -> str:
    """``320`` or ``384x512`` (H x W), with the tile grid when tiled."""
    h, w = record["image_size"]
    size = str(h) if h == w else f"{h}x{w}"
    tiling = record.get("tiling")
    if not tiling:
        return f"{size}, resized"
    (th, tw), (sh, _) = tiling["tile_size"], tiling["stride"]
    return f"{size} canvas, {tiling['tiles']} tiles of {th if th == tw else f'{th}x{tw}'} (stride {sh})"


HEADER = [
    "model",
    "data",
    "input",
    "image AUROC",
    "pixel AUROC",
    "AUPRO",
    "fit, s",
    "test, s (images/s)",
    "peak RSS, MB",
]


def row(name: str, r: dict) -> list[str]:
    """The table cells of run ``name``'s record ``r``."""
    words = shlex.split(r["command"])
    epochs = words[words.index("--trainer.max_epochs") + 1] if "--trainer.max_epochs" in words else "?"
    model = "PatchCore" if name.startswith("patchcore") else f"FastFlow, {epochs} epochs"
    coreset = r["hparams"].get("coreset_ratio")
    if coreset is not None:
        model = f"PatchCore ({100 * coreset:.3g} % coreset)"
    return [
        model,
        "mvtec_ad/screw" if "screw" in name else "magnetic_tile",
        _size(r),
        f"{r['image_AUROC']:.3f}",
        f"{r['pixel_AUROC']:.3f}",
        f"{r['AUPRO']:.3f}",
        f"{r['fit_s']:,.0f}",
        f"{r['test_s']:,.0f} ({r['test_img_per_s']:.1f})",
        f"{r['peak_rss_mb']:,}",
    ]


def table(out_dir: Path) -> str:
    """The Markdown table of the recorded runs, in ``RUNS`` order (docs/benchmarks.md generates the same)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for name in RUNS:
        path = out_dir / f"tiling_{name}.json"
        if path.is_file():
            lines.append("| " + " | ".join(row(name, json.loads(path.read_text()))) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", help=f"runs to do, in order: {', '.join(RUNS)}")
    parser.add_argument("--all", action="store_true", help="every run, one after the other")
    parser.add_argument("--list", action="store_true", help="print the runs' commands and exit")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the records")
    parser.add_argument("--root-dir", type=Path, default=Path("/tmp/adx_tiling_runs"), help="run folders")
    parser.add_argument("--out-dir", type=Path, default=OUT, help="where tiling_<run>.json go")
    args = parser.parse_args(argv)
    if args.list:
        for name in RUNS:
            print(f"{name}: {shlex.join(command(name, args.root_dir / name))}")
        return
    if args.table:
        print(table(args.out_dir))
        return
    names = list(RUNS) if args.all else args.runs
    if not names:
        parser.error("name runs, or pass --all or --list")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    if not (DATA / "mvtec_ad" / "screw").is_dir():
        raise SystemExit(f"real data not found under {DATA}")
    for name in names:
        run(name, args.root_dir, args.out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
