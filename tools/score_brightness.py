"""How much of a run's image ranking is the test images' brightness: rank correlation and AUROC, per run.

    python tools/score_brightness.py RUN [RUN ...] [--out docs/bench/screw_brightness.json]

RUN is one of: a JSON file with ``image_scores`` ({image path: score}; tools/peer_scratch.py writes it for
the peer), tools/bench.py's record (``adx.image_scores`` and, side by side, ``peer.image_scores``: a row
for each side), or adx's ``scores.csv`` (``path``, ``label``, ``image_score``; written by every
``adx test``). ``LABEL=RUN`` names a run in the output. For each run and side: the image AUROC of its
scores, the image AUROC of the images' mean brightness (grayscale, [0, 1]; tools/brightness_baseline.py)
on the same images, and Spearman's rank correlation between score and brightness over all test images, over
the good ones and over the defective ones. Labels come from the folder (``good`` = 0) when the file has
none.

On a category where brightness alone separates good from defective images (screw: 1.000), a score that
follows brightness inside each group too (high rho within good and within defective) is ranking
brightness, whatever its AUROC; a score that ranks defects does not need to.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from pathlib import Path

import torch
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.classification import binary_auroc

from brightness_baseline import brightness  # tools/ is on sys.path when run as a script


def read_runs(path: Path) -> list[tuple[str, list[str], list[float], list[int | None]]]:
    """(side, image paths, scores, labels or None) of each run in a file (see the module docstring)."""
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        missing = {"path", "image_score"} - set(rows[0] if rows else {})
        if missing:
            raise SystemExit(f"{path}: no column(s) {sorted(missing)}; expected adx's scores.csv")
        labels = [int(float(r["label"])) if r.get("label", "") != "" else None for r in rows]
        return [("adx", [r["path"] for r in rows], [float(r["image_score"]) for r in rows], labels)]
    record = json.loads(path.read_text())
    found = [(record.get("peer", "adx"), record["image_scores"])] if "image_scores" in record else []
    for side, name in (("adx", "adx"), ("peer", "anomalib")):
        scores = record.get(side, {}).get("image_scores") if isinstance(record.get(side), dict) else None
        if scores:
            found.append((name, scores))
    if not found:
        raise SystemExit(
            f"{path}: no image_scores (a peer_scratch.py or tools/bench.py record, or scores.csv)"
        )
    return [(side, list(s), [float(v) for v in s.values()], [None] * len(s)) for side, s in found]


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Image AUROC of any real scores, min-max scaled to [0, 1] first (an order-keeping map: torchmetrics would
    squash scores outside [0, 1] through a sigmoid, which ties large ones)."""
    s = scores.double()
    span = (s.max() - s.min()).clamp_min(1e-300)
    return round(float(binary_auroc((s - s.min()) / span, labels)), 4)


def rho(x: torch.Tensor, y: torch.Tensor) -> float:
    return round(float(spearman_corrcoef(x.double(), y.double())), 4)


def analyse(name: str, path: Path, side: str, paths: list[str], scores: list[float], labels: list) -> dict:
    y = torch.tensor(
        [
            lab if lab is not None and lab >= 0 else int(Path(p).parent.name != "good")
            for p, lab in zip(paths, labels, strict=True)
        ]
    )
    s = torch.tensor(scores)
    b = torch.tensor([brightness(Path(p)) for p in paths])
    good, bad = y == 0, y == 1
    return {
        "run": name,
        "side": side,
        "file": str(path),
        "images": len(paths),
        "image_AUROC": auroc(s, y),
        "image_AUROC_of_brightness": auroc(b, y),
        "rho_all": rho(s, b),
        "rho_good": rho(s[good], b[good]),
        "rho_defective": rho(s[bad], b[bad]),
        "tied_scores": len(s) - len(torch.unique(s)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="RUN or LABEL=RUN")
    parser.add_argument("--out", help="write the rows as JSON here (with the command)")
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        name, _, file = run.rpartition("=")
        path = Path(file)
        if not path.is_file():
            raise SystemExit(f"no such run file: {path}")
        for side, paths, scores, labels in read_runs(path):
            rows.append(analyse(name or path.stem, path, side, paths, scores, labels))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"command": "python " + shlex.join(sys.argv), "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
