"""Peak memory of exported bundles: one fresh process per bundle x runtime x batch size.

    python tools/bench_bundle_memory.py --bundle A/export/onnx --bundle B/export/onnx --batches 1 16 \
        --out docs/bench/bundle_memory.json

Each measurement is a new Python process that loads the bundle with ``adx.deploy.Inferencer`` for one
runtime, runs one random batch at the bundle's input size twice, and reports its peak resident memory
(VmHWM) and the image scores, so bundles of the same model can be checked to agree. Memory does not depend
on machine load; the seconds of the second call are recorded but are only comparable on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
from adx.deploy import Inferencer, load_metadata
bundle, runtime, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
h, w = load_metadata(bundle)["input_size"]
x = np.random.default_rng(0).random((batch, 3, h, w), dtype=np.float32)
inf = Inferencer(bundle, runtime=runtime)
inf.run(x)
t0 = time.perf_counter()
out = inf.run(x)
seconds = time.perf_counter() - t0
scores = out["image_score"]
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": round(hwm / 1024), "seconds": round(seconds, 3),
                  "scores": [float(s) for s in np.asarray(scores).reshape(-1)]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", action="append", required=True)
    parser.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for bundle in args.bundle:
        for runtime in args.runtimes:
            for batch in args.batches:
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, bundle, runtime, str(batch)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = {
                    "bundle": bundle,
                    "runtime": runtime,
                    "batch": batch,
                    **json.loads(proc.stdout.splitlines()[-1]),
                }
                print(json.dumps({k: v for k, v in row.items() if k != "scores"}), flush=True)
                rows.append(row)
    Path(args.out).write_text(
        json.dumps({"command": "python " + " ".join(sys.argv), "runs": rows}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
