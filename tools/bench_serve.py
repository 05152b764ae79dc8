"""Load benchmark of ``adx serve``: N predict requests from C concurrent clients against a real uvicorn server.

    python tools/bench_serve.py --bundle RUN/export/onnx --images RUN_DATA/test --out docs/bench/serve_load.json

Starts ``python -m adx.serve --bundle B`` on a free port of 127.0.0.1 (a separate process, so the clients do
not share its interpreter), sends ``--warmup`` requests, then ``--requests`` multipart POSTs to /api/predict
(map as PNG, the page's default) from ``--concurrency`` clients, each on its own keep-alive connection and
thread, cycling through the images. Writes p50/p95/max latency (per request, seen by the client: upload,
decode, model, PNG, JSON) and throughput to a JSON with the command, date, machine and bundle.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from adx.deploy import load_metadata
from adx.serve.loadtest import hammer, running_server

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import onnxruntime

    return {
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


def images(paths: list[str], limit: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of the image files given or found (recursively) in the folders given."""
    found: list[Path] = []
    for item in map(Path, paths):
        found += (
            sorted(p for p in item.rglob("*") if p.suffix.lower() in SUFFIXES) if item.is_dir() else [item]
        )
    found = [p for p in found if "ground_truth" not in p.parts][:limit]
    if not found:
        raise SystemExit(f"bench_serve: no images in {paths}")
    return [(p.name, p.read_bytes()) for p in found]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", required=True, help="bundle folder (adx export)")
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders to send")
    parser.add_argument("--max_images", type=int, default=32)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default="docs/bench/serve_load.json")
    parser.add_argument("--serve_args", default="", help="extra adx serve options, e.g. '--threads 1'")
    parser.add_argument("--note", default="", help="free text stored with the numbers")
    args = parser.parse_args()
    files = images(args.images, args.max_images)
    meta = load_metadata(args.bundle)
    serve_args = ["--bundle", args.bundle, *shlex.split(args.serve_args)]
    load_before = os.getloadavg()[0]
    with running_server(serve_args, log=Path(args.out).with_suffix(".server.log")) as url:
        if args.warmup:
            hammer(url, files, requests=args.warmup, concurrency=min(args.warmup, args.concurrency))
        single = hammer(url, files, requests=20, concurrency=1)  # one client: latency without queueing
        stats = hammer(url, files, requests=args.requests, concurrency=args.concurrency)
    Path(args.out).with_suffix(".server.log").unlink(missing_ok=True)
    sizes = sorted({len(data) for _, data in files})
    report = {
        "benchmark": "adx serve load: POST /api/predict (multipart, map=png) from concurrent clients",
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "load_average_before": round(load_before, 2)},
        "bundle": {
            "folder": str(args.bundle),
            "method": meta.get("method"),
            "format": meta.get("format"),
            "input_size": meta.get("input_size"),
            "backbone": (meta.get("backbone") or {}).get("name"),
        },
        "images": {"count": len(files), "bytes_min": sizes[0], "bytes_max": sizes[-1]},
        "server": shlex.join(["python", "-m", "adx.serve", *serve_args]) + " (uvicorn, 1 process)",
        "single_client": {k: single[k] for k in ("requests", "p50_ms", "p95_ms", "max_ms", "throughput_rps")},
        "note": args.note,
        **stats,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{stats['requests']} requests, {stats['concurrency']} clients: p50 {stats['p50_ms']} ms, "
        f"p95 {stats['p95_ms']} ms, max {stats['max_ms']} ms, {stats['throughput_rps']} req/s, "
        f"{stats['n_failures']} failures -> {args.out}"
    )
    if stats["n_failures"]:
        raise SystemExit(f"bench_serve: {stats['n_failures']} requests failed: {stats['failures']}")


if __name__ == "__main__":
    main()
