"""Training on tiles: every grid tile of every training canvas as its own sample.

:class:`TileDataset` turns a dataset of canvases (``AnomalyDataset`` at ``image_size``) into one of
tiles: sample ``i * T + k`` is tile ``k`` (:class:`adx.tiling.TileGrid`, row-major) of image ``i``, with
its mask cut the same way and the key ``<path>#t<k>`` as ``path``, so feature caches and PatchCore's
memory-bank order see distinct tiles. A canvas is decoded once for all its tiles while it stays in a
small per-worker cache of recently decoded canvases (``cache_images``).

Gradient-trained methods shuffle with :class:`TileShuffleSampler`: images in a new seeded order every
epoch, and the tiles of each group of ``group`` consecutive images shuffled together, so batches mix
tiles of several images while every canvas is still decoded about once per worker and epoch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from adx.tiling import TileGrid, tile_key

GROUP_IMAGES = 8
"""Images whose tiles are shuffled together by :class:`TileShuffleSampler` (and canvases cached per worker)."""


class TileDataset(Dataset):
    """Tiles of the canvases of ``base`` (a dataset of dicts with ``image`` [3,H,W] and ``mask`` [1,H,W])."""

    def __init__(self, base: Dataset, grid: TileGrid, cache_images: int = GROUP_IMAGES) -> None:
        self.base, self.grid, self.cache_images = base, grid, max(1, int(cache_images))
        self.samples = getattr(base, "samples", None)
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.base) * self.grid.count  # type: ignore[arg-type]

    def _canvas(self, index: int) -> dict[str, Any]:
        item = self._cache.get(index)
        if item is None:
            item = self.base[index]
            self._cache[index] = item
            while len(self._cache) > self.cache_images:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(index)
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_index, k = divmod(int(index), self.grid.count)
        item = self._canvas(image_index)
        (y, x), (th, tw) = self.grid.offsets[k], self.grid.tile
        out = dict(item)
        out["image"] = item["image"][:, y : y + th, x : x + tw].clone()
        out["mask"] = item["mask"][:, y : y + th, x : x + tw].clone()
        out["path"] = tile_key(item["path"], k)
        out["tile"] = k
        return out


class TileShuffleSampler(Sampler[int]):
    """Tile indices of a :class:`TileDataset`: images shuffled per epoch, tiles shuffled within image groups.

    Seeded by ``seed`` and the epoch (Lightning calls :meth:`set_epoch`), so runs reproduce.
    """

    def __init__(self, n_images: int, tiles_per_image: int, seed: int = 0, group: int = GROUP_IMAGES) -> None:
        self.n_images, self.count, self.seed, self.group = n_images, tiles_per_image, seed, max(1, group)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_images * self.count

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, 2, self.epoch])
        images = rng.permutation(self.n_images)
        for start in range(0, self.n_images, self.group):
            members = images[start : start + self.group]
            tiles = (members[:, None] * self.count + np.arange(self.count)[None, :]).reshape(-1)
            yield from rng.permutation(tiles).tolist()
