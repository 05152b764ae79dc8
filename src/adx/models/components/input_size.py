"""The image sizes a data module will feed a model, with the flag that sets each (for size checks)."""

from __future__ import annotations

from typing import Any


def input_sizes(datamodule: Any) -> list[tuple[tuple[int, int], str]]:
    """[(size, flag)] of every input size the networks will see from ``datamodule``.

    With a tiling grid: the tile size (inference always runs on the tiles), plus the whole image size when the
    training images are not cut into tiles (``--data.train_tiles false``). Without one: the image size. Empty
    when the data module names no size (images keep their own).
    """
    sizes: list[tuple[tuple[int, int], str]] = []
    grid = getattr(datamodule, "tiling", None)
    if grid is not None:
        sizes.append((tuple(int(v) for v in grid.tile), "--data.tile_size"))  # type: ignore[arg-type]
    if grid is None or not getattr(datamodule, "train_on_tiles", True):
        size = getattr(datamodule, "image_size", None)
        if size is not None:
            sizes.append((tuple(int(v) for v in size), "--data.image_size"))  # type: ignore[arg-type]
    return sizes
