"""Tiled inference for high-resolution images: a fixed grid of tiles over the canvas, maps blended back.

With tiling on (``--data.tile_size``), ``--data.image_size`` is the *canvas*: every image is resized to it
(e.g. its native 1024 x 1024) and the model sees tiles of it, never the whole canvas. The grid is static,
computed once from canvas, tile and stride (:class:`TileGrid`): offsets ``0, s, 2s, ...`` along each
axis, plus one tile flush with the far border when the stride does not land on it, so every canvas pixel
is covered and no tile leaves the canvas.

:class:`Tiler` wraps a model (``forward(images) -> (scores [B], maps [B,h,w])``) and is itself such a
model at canvas size: it cuts the canvas batch into its B*T tiles (static slices), runs the model on them
as one batch (in eager mode in chunks of ``tile_batch`` tiles, which gives the same numbers with bounded
memory), and stitches the tile maps back by a weighted average. Each tile's map is multiplied by a
separable window that is 1 in the tile's middle and ramps linearly to near zero across the overlap with
its neighbours (:func:`blend_window`); the sum over tiles is divided by the sum of the windows (a static
buffer), so overlaps cross-fade, seams from the tiles' borders are weighted down, and a map that is
constant across tiles is reproduced exactly. The image score is the largest tile score: each method keeps
its own image score (PatchCore's re-weighted patch distance, the flows' map maximum), and a defect seen
by any tile raises it. Nothing branches on tensor values, so the wrapped inference module exports with a
dynamic batch as before (height and width are resized to the canvas first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.imageio import AdxDataError

TILE_BATCH = 32
"""Tiles per model call in eager mode (bounds memory; the numbers do not depend on it)."""


def _pair(value: int | Sequence[int], option: str) -> tuple[int, int]:
    """An int (square) or [H, W] of positive ints as (H, W); raise AdxDataError naming ``option``."""
    hw = (value, value) if isinstance(value, int) else tuple(value)
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in hw):
        raise AdxDataError(f"{option} must be an int or [H, W] of ints, got {value!r}. Fix {option}.")
    return int(hw[0]), int(hw[1])


def tile_offsets(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of the tiles along one axis: 0, stride, ... and a last tile flush with the border."""
    last = size - tile
    offsets = list(range(0, last + 1, stride))
    if offsets[-1] != last:
        offsets.append(last)
    return offsets


@dataclass(frozen=True)
class TileGrid:
    """The static grid of ``tile`` (H, W) tiles at ``stride`` (H, W) over a ``canvas`` (H, W)."""

    canvas: tuple[int, int]
    tile: tuple[int, int]
    stride: tuple[int, int]

    @property
    def ys(self) -> list[int]:
        """Row offsets of the tiles."""
        return tile_offsets(self.canvas[0], self.tile[0], self.stride[0])

    @property
    def xs(self) -> list[int]:
        """Column offsets of the tiles."""
        return tile_offsets(self.canvas[1], self.tile[1], self.stride[1])

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """(y, x) of every tile, row-major: tile k of an image is ``offsets[k]``."""
        return [(y, x) for y in self.ys for x in self.xs]

    @property
    def count(self) -> int:
        """Tiles per canvas."""
        return len(self.ys) * len(self.xs)

    def describe(self) -> str:
        """e.g. ``256x256 tiles at stride 192x192: 2x3 = 6 per 384x512 canvas``."""
        (th, tw), (sh, sw), (h, w) = self.tile, self.stride, self.canvas
        return (
            f"{th}x{tw} tiles at stride {sh}x{sw}: {len(self.ys)}x{len(self.xs)} = {self.count} per "
            f"{h}x{w} canvas"
        )

    def facts(self) -> dict[str, Any]:
        """Tile size, stride and tiles per canvas, as run reports and bundle metadata record them."""
        return {"tile_size": list(self.tile), "stride": list(self.stride), "tiles": self.count}

    def as_tensor(self) -> Tensor:
        """[tile_h, tile_w, stride_h, stride_w] (the model's ``tiling`` buffer)."""
        return torch.tensor([*self.tile, *self.stride], dtype=torch.long)

    @classmethod
    def from_tensor(cls, canvas: Sequence[int], tiling: Tensor) -> TileGrid | None:
        """The grid stored in a model's ``input_size`` and ``tiling`` buffers; None when tiling is off."""
        th, tw, sh, sw = (int(v) for v in tiling)
        if th <= 0 or tw <= 0:
            return None
        return cls((int(canvas[0]), int(canvas[1])), (th, tw), (sh, sw))


def make_grid(
    canvas: int | Sequence[int], tile_size: int | Sequence[int], stride: int | Sequence[int] | None = None
) -> TileGrid:
    """Check the tiling options against the canvas (``--data.image_size``) and return the grid.

    ``stride`` None overlaps neighbouring tiles by a quarter of the tile (stride = 3/4 of the tile).
    """
    h, w = _pair(canvas, "--data.image_size")
    th, tw = _pair(tile_size, "--data.tile_size")
    if th < 1 or tw < 1:
        raise AdxDataError(f"--data.tile_size must be positive, got {tile_size!r}. Fix --data.tile_size.")
    if th > h or tw > w:
        raise AdxDataError(
            f"--data.tile_size {th}x{tw} is larger than the canvas --data.image_size {h}x{w} (with tiling, "
            f"image_size is the size every image is resized to before it is cut into tiles). Use a tile of at "
            f"most {min(h, th)}x{min(w, tw)}, or a larger --data.image_size (e.g. the images' native size)."
        )
    sh, sw = (
        (max(1, th * 3 // 4), max(1, tw * 3 // 4)) if stride is None else _pair(stride, "--data.tile_stride")
    )
    if not (1 <= sh <= th and 1 <= sw <= tw):
        raise AdxDataError(
            f"--data.tile_stride {sh}x{sw} must be between 1 and the tile size {th}x{tw} (a larger stride "
            f"would leave pixels between tiles unseen). Use e.g. --data.tile_stride {max(1, th * 3 // 4)} "
            "(a quarter of the tile overlaps its neighbour), or leave it unset for that default."
        )
    return TileGrid((h, w), (th, tw), (sh, sw))


def check_tile_multiple(grid: TileGrid, multiple: int, what: str) -> None:
    """Raise AdxDataError unless the tile's sides are multiples of ``multiple`` (the backbone's coarsest map)."""
    th, tw = grid.tile
    if multiple > 1 and (th % multiple or tw % multiple):
        bad = th if th % multiple else tw
        lower, upper = bad // multiple * multiple, (bad // multiple + 1) * multiple
        choices = f"{lower} or {upper}" if lower > 0 else str(upper)
        raise AdxDataError(
            f"--data.tile_size {th}x{tw} is not a multiple of {multiple}, {what}: the tile's feature maps would "
            f"not line up with its pixels. Use a multiple of {multiple}, e.g. --data.tile_size {choices}."
        )


def _ramp(tile: int, stride: int) -> Tensor:
    """[tile] window along one axis: 1 in the middle, linear ramps over the overlap (tile - stride) at both ends."""
    overlap = tile - stride
    i = torch.arange(tile, dtype=torch.float64) + 0.5
    if overlap <= 0:
        return torch.ones(tile, dtype=torch.float64)
    return torch.minimum(torch.minimum(i / overlap, (tile - i) / overlap), torch.ones(()))


def blend_window(grid: TileGrid) -> Tensor:
    """[tile_h, tile_w] float32 blending weights of one tile (positive everywhere).

    Two neighbours at the regular stride have ramps that sum to 1 across their overlap, so the regular part
    of the grid is a partition of unity; the flush last tile and the canvas borders are handled by dividing
    by the summed weights (:func:`weight_sum`).
    """
    return (
        _ramp(grid.tile[0], grid.stride[0])[:, None] * _ramp(grid.tile[1], grid.stride[1])[None, :]
    ).float()


def weight_sum(grid: TileGrid) -> Tensor:
    """[H, W] float32: the blending weights of all tiles added up on the canvas (> 0 at every pixel)."""
    window = blend_window(grid).double()
    total = torch.zeros(grid.canvas, dtype=torch.float64)
    th, tw = grid.tile
    for y, x in grid.offsets:
        total[y : y + th, x : x + tw] += window
    return total.float()


def cut(images: Tensor, grid: TileGrid) -> Tensor:
    """Canvas batch [B,C,H,W] -> tiles [B*T,C,th,tw], image-major (tile k of image b at ``b*T + k``)."""
    th, tw = grid.tile
    tiles = [images[:, :, y : y + th, x : x + tw] for y, x in grid.offsets]
    return torch.stack(tiles, dim=1).reshape(-1, images.shape[1], th, tw)


class Tiler(nn.Module):
    """A model at canvas size made of a model at tile size: cut, run on all tiles, blend the maps."""

    def __init__(self, model: nn.Module, grid: TileGrid, tile_batch: int = TILE_BATCH) -> None:
        super().__init__()
        self.model, self.grid, self.tile_batch = model, grid, max(1, int(tile_batch))
        device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
        self.register_buffer("window", blend_window(grid).to(device), persistent=False)
        self.register_buffer("inverse_weight", (1.0 / weight_sum(grid)).to(device), persistent=False)

    def _run(self, tiles: Tensor) -> tuple[Tensor, Tensor]:
        """The model on all tiles: one call when a graph is recorded, chunks of ``tile_batch`` in eager mode."""
        from adx.inference import exporting

        if exporting() or len(tiles) <= self.tile_batch:
            return self.model(tiles)
        outs = [self.model(tiles[i : i + self.tile_batch]) for i in range(0, len(tiles), self.tile_batch)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def stitch(self, maps: Tensor) -> Tensor:
        """Tile maps [B*T,th,tw] -> canvas maps [B,H,W], the weighted average over the tiles covering each pixel."""
        (h, w), (th, tw), count = self.grid.canvas, self.grid.tile, self.grid.count
        weighted = maps.reshape(-1, count, th, tw) * self.window
        out = None
        for k, (y, x) in enumerate(self.grid.offsets):
            placed = F.pad(weighted[:, k], (x, w - x - tw, y, h - y - th))  # static sizes: a Pad op in graphs
            out = placed if out is None else out + placed
        return out * self.inverse_weight

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Canvas images [B,3,H,W] -> image scores [B] (largest tile score) and blended maps [B,H,W]."""
        scores, maps = self._run(cut(images, self.grid))
        return scores.reshape(-1, self.grid.count).amax(dim=1), self.stitch(maps)


def tile_key(path: str, k: int) -> str:
    """The key of tile ``k`` of an image (caches, memory-bank order): ``<path>#t0007``."""
    return f"{path}#t{k:04d}"


def cut_batch(batch: dict[str, Any], grid: TileGrid) -> dict[str, Any]:
    """A canvas batch dict -> the batch of its tiles: images and masks cut, paths as tile keys, rest repeated."""
    n, count = len(batch["image"]), grid.count
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in ("image", "mask") and isinstance(value, Tensor) and value.ndim == 4:
            out[key] = cut(value, grid)
        elif key == "path":
            out[key] = [tile_key(str(p), k) for p in value for k in range(count)]
        elif isinstance(value, Tensor) and value.ndim > 0 and len(value) == n:
            out[key] = value.repeat_interleave(count, dim=0)
        elif (
            isinstance(value, list | tuple)
            and len(value) == n
            and not (value and isinstance(value[0], Tensor))
        ):
            out[key] = [v for v in value for _ in range(count)]
        elif key != "features":  # canvas features do not belong to the tiles
            out[key] = value
    return out
