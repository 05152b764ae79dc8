"""Benchmark the fast greedy coreset against the plain reference algorithm.

Usage::

    python tools/bench_coreset.py [--features file.pt | --patchcore ROOT CATEGORY [--image-size 320]]
                                  [--n 327680] [--dim 152] [--ratio 0.1] [--save-features file.pt]
                                  [--reference-steps 2000] [--out docs/bench_coreset.json]

Times :func:`adx.models.components.coreset.greedy_coreset` for the full coreset, times the reference for
``--reference-steps`` steps (its full time is extrapolated linearly: every reference step costs the same
O(N * d)), checks that both select the same first ``--reference-steps`` indices, and prints / writes JSON.
Without ``--features`` a clustered random data set resembling CNN patch features is generated.
``--patchcore ROOT CATEGORY`` collects the real patch features PatchCore's defaults give on the training
images of an MVTec-layout category instead (offline lite0 weights; training images in sorted path order,
without the validation hold-out, so the count differs from ``adx fit``'s); ``--save-features`` writes them,
so another checkout's copy of this script can time its coreset on the same matrix (``--features``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adx.models.components.coreset import greedy_coreset, greedy_coreset_reference, sample_size


def synthetic_features(n: int, dim: int, seed: int = 0, components: int = 64, rank: int = 12) -> torch.Tensor:
    """Mixture of low-rank Gaussians [n, dim], non-negative like ReLU/avg-pooled CNN patch features."""
    gen = torch.Generator().manual_seed(seed)
    weights = -torch.rand(components, generator=gen).log_()  # Dirichlet(1): uneven cluster sizes
    comp = torch.multinomial(weights, n, replacement=True, generator=gen)
    means = torch.randn(components, dim, generator=gen).clamp_min_(0) + 0.2
    factors = torch.randn(components, dim, rank, generator=gen) * (0.5 / math.sqrt(rank))
    scales = torch.rand(components, generator=gen) * 1.5 + 0.25  # per-component spread
    out = torch.empty(n, dim)
    chunk = 1 << 16
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        k = comp[start:stop]
        z = torch.randn(stop - start, rank, 1, generator=gen)
        x = torch.bmm(factors[k], z).squeeze(2) * scales[k, None]
        x += means[k] + 0.05 * torch.randn(stop - start, dim, generator=gen)
        out[start:stop] = x.clamp_min_(0)
    return out


def patchcore_features(root: Path, category: str, image_size: int) -> torch.Tensor:
    """PatchCore's default patch features [N, D] of ``root/category/train/good`` (sorted), N = images * h * w."""
    from adx.data.dataset import load_image
    from adx.data.samples import list_images
    from adx.models.patchcore.torch_model import PatchCoreModel

    good = root / category / "train" / "good"
    paths = list_images(good) if good.is_dir() else []
    if not paths:
        raise SystemExit(f"no training images under {good}: check ROOT CATEGORY")
    model = PatchCoreModel().eval()
    rows = []
    with torch.no_grad():
        for start in range(0, len(paths), 16):
            arrays = [load_image(str(p), (image_size, image_size))[0] for p in paths[start : start + 16]]
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
            emb = model.embed(images)
            rows.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
    return torch.cat(rows)


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the result dict (also printed and optionally written as JSON)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", type=Path, default=None, help="torch.save'd [N, D] tensor")
    parser.add_argument(
        "--patchcore", nargs=2, metavar=("ROOT", "CATEGORY"), default=None, help="real PatchCore features"
    )
    parser.add_argument("--image-size", type=int, default=320, help="with --patchcore")
    parser.add_argument("--save-features", type=Path, default=None, help="torch.save the features here")
    parser.add_argument("--n", type=int, default=327680, help="number of synthetic features")
    parser.add_argument("--dim", type=int, default=152, help="synthetic feature dimension")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset sampling ratio")
    parser.add_argument("--projection-dim", type=int, default=128, help="JL projection dim (<= 0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-steps", type=int, default=2000, help="0 skips the reference")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.features is not None:
        features = torch.load(args.features, map_location="cpu")
        source = str(args.features)
    elif args.patchcore is not None:
        root, category = Path(args.patchcore[0]), args.patchcore[1]
        features = patchcore_features(root, category, args.image_size)
        source = f"PatchCore default features of {root / category}/train/good at {args.image_size} px"
    else:
        features = synthetic_features(args.n, args.dim, seed=args.seed)
        source = "synthetic mixture of low-rank gaussians"
    features = features.reshape(-1, features.shape[-1])
    load_s = time.perf_counter() - t0
    if args.save_features is not None:
        torch.save(features, args.save_features)
    n_total, dim = features.shape
    n = sample_size(n_total, args.ratio)
    proj = args.projection_dim if args.projection_dim > 0 else None
    print(f"features: {n_total} x {dim} ({source}, {load_s:.1f}s); coreset n = {n}", file=sys.stderr)

    t0 = time.perf_counter()
    fast = greedy_coreset(features, n, projection_dim=proj, seed=args.seed, progress=not args.no_progress)
    fast_s = time.perf_counter() - t0
    rss_after_fast = peak_rss_mib()

    result: dict = {
        "source": source,
        "N": n_total,
        "D": dim,
        "ratio": args.ratio,
        "n": n,
        "projection_dim": proj,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "fast_seconds": round(fast_s, 3),
        "fast_steps_per_s": round(n / fast_s, 1),
        "peak_rss_mib_after_fast": round(rss_after_fast, 1),
    }
    ref_steps = min(args.reference_steps, n)
    if ref_steps > 0:
        t0 = time.perf_counter()
        ref = greedy_coreset_reference(features, ref_steps, projection_dim=proj, seed=args.seed)
        ref_s = time.perf_counter() - t0
        ref_rate = ref_steps / ref_s
        result.update(
            {
                "reference_steps": ref_steps,
                "reference_seconds": round(ref_s, 3),
                "reference_steps_per_s": round(ref_rate, 2),
                "reference_seconds_extrapolated": round(n / ref_rate, 1),
                "reference_extrapolation": "linear in steps (every reference step costs O(N * d))",
                "speedup": round((n / ref_rate) / fast_s, 1),
                "identical_prefix": bool(torch.equal(ref, fast[:ref_steps])),
            }
        )
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
