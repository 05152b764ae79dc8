"""Where DSR's exported graph picks other codebook vectors than torch: the four nearest-vector searches compared.

    python tools/dsr_code_flips.py --ckpt RUN/checkpoints/last.ckpt --images DATA/test --sizes 64x64 80x96 \
        --limit 6 --out report.json

A thin command over :func:`adx.models.dsr.code_flips.code_flips`: the first ``--limit`` images under
``--images`` (sorted by path, ground-truth masks left out), resized bilinearly to each ``--sizes`` as the
export test does (the graph resizes to the fitted size itself), go through torch and through ONNX Runtime
with the ArgMin outputs exposed. Reported per size: the largest score and map differences and, per search,
the indices that differ with torch's relative gap there (near 1e-7: a near-tie resolved by rounding), and
whether everything is explained by near-tie flips (``unexplained`` empty).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adx.deploy_cli import load_model
from adx.imageio import read_image
from adx.models.dsr.code_flips import code_flips, unexplained

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _images(folder: Path, limit: int) -> torch.Tensor:
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and "ground_truth" not in p.parts
    )
    if not files:
        raise SystemExit(f"dsr_code_flips: no images under {folder}")
    arrays = [torch.from_numpy(read_image(str(p))).permute(2, 0, 1)[None] for p in files[:limit]]
    size = arrays[0].shape[-2:]
    return torch.cat([torch.nn.functional.interpolate(a, size=size, mode="bilinear") for a in arrays])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument(
        "--images", required=True, type=Path, help="folder of test images (searched recursively)"
    )
    parser.add_argument("--sizes", nargs="+", default=["64x64", "80x96", "48x40"], help="HxW of the batches")
    parser.add_argument("--limit", type=int, default=6, help="images used (sorted by path)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = load_model(args.ckpt)
    if type(model).__name__ != "DSR":
        raise SystemExit(f"dsr_code_flips: {args.ckpt} holds {type(model).__name__}, not DSR")
    images = _images(args.images, args.limit)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    batches = [torch.nn.functional.interpolate(images, size=s, mode="bilinear") for s in sizes]
    reports = code_flips(model, batches)
    text = json.dumps(
        {"checkpoint": str(args.ckpt), "sizes": reports, "unexplained": unexplained(reports)}, indent=1
    )
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
