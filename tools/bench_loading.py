"""Image loading cost at high resolution: adx's fast path vs plain float resizing, per image.

    python tools/bench_loading.py --size 1600x1200 --target 256 --repeats 10

Writes a synthetic textured 1600x1200 image as JPEG (quality 92) and PNG to a temporary folder and
times ``adx.data.dataset.load_image(path, target)`` against decoding at full size plus an antialiased
float resize (what adx did before, and still does for downscales under 2x). One torch thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adx.data.dataset import _resize_array, _to_rgb_array, load_image


def _time(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="1600x1200", help="WxH of the source image")
    parser.add_argument("--target", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    w, h = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.linspace(0, 200, h), np.linspace(0, 55, w))[..., None]
    pixels = (ramp + rng.normal(0, 5, (h, w, 3))).clip(0, 255).astype(np.uint8)
    target = (args.target, args.target)
    with tempfile.TemporaryDirectory() as tmp:
        for suffix, options in ((".jpg", {"quality": 92}), (".png", {})):
            path = str(Path(tmp) / f"source{suffix}")
            Image.fromarray(pixels).save(path, **options)

            def plain(path: str = path) -> np.ndarray:
                with Image.open(path) as img:
                    return _resize_array(_to_rgb_array(img), target)

            fast_ms = _time(lambda path=path: load_image(path, target), args.repeats)
            plain_ms = _time(plain, args.repeats)
            diff = np.abs(load_image(path, target)[0] - plain())
            print(
                f"{suffix[1:]:4s} {w}x{h} -> {args.target}: adx {fast_ms:.1f} ms, float path {plain_ms:.1f} ms "
                f"({plain_ms / fast_ms:.1f}x); max |diff| {diff.max() * 255:.2f} grey levels, mean {diff.mean() * 255:.3f}"
            )


if __name__ == "__main__":
    main()
