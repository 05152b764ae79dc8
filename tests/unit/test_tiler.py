"""The tile grid, the blending and the Tiler (adx.tiling), and the tile dataset and sampler (adx.data.tiles)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from adx.calibration import Calibrator
from adx.data.samples import AdxDataError
from adx.data.tiles import TileDataset, TileShuffleSampler
from adx.inference import InferenceModule
from adx.tiling import (
    TileGrid,
    Tiler,
    blend_window,
    check_tile_multiple,
    cut,
    cut_batch,
    make_grid,
    tile_key,
    tile_offsets,
    weight_sum,
)

GRIDS = [  # (canvas, tile, stride): regular, flush last tile, no overlap, stride 1, rectangular, tile = canvas
    ((96, 96), (64, 64), (32, 32)),
    ((100, 90), (32, 32), (24, 24)),
    ((64, 128), (32, 32), (32, 32)),
    ((20, 20), (8, 8), (1, 1)),
    ((48, 80), (32, 48), (16, 40)),
    ((64, 64), (64, 64), (48, 48)),
]


class MeanModel(nn.Module):
    """Score = the tile's largest pixel mean, map = the channel mean of every pixel (what it was given)."""

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        maps = images.mean(dim=1)
        return maps.flatten(1).amax(dim=1), maps


class ConstantModel(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        maps = torch.full_like(images[:, 0], self.value)
        return maps.flatten(1).amax(dim=1), maps


@pytest.mark.parametrize("canvas,tile,stride", GRIDS)
def test_grid_covers_every_pixel_and_stays_inside(canvas, tile, stride) -> None:
    grid = TileGrid(canvas, tile, stride)
    covered = torch.zeros(canvas, dtype=torch.long)
    for y, x in grid.offsets:
        assert 0 <= y <= canvas[0] - tile[0] and 0 <= x <= canvas[1] - tile[1]
        covered[y : y + tile[0], x : x + tile[1]] += 1
    assert int(covered.min()) >= 1
    assert grid.ys[-1] == canvas[0] - tile[0] and grid.xs[-1] == canvas[1] - tile[1]  # flush last tile
    assert grid.count == len(grid.offsets) == len(set(grid.offsets))


def test_offsets() -> None:
    assert tile_offsets(96, 64, 32) == [0, 32]
    assert tile_offsets(100, 32, 24) == [0, 24, 48, 68]  # the last one flush with the border
    assert tile_offsets(64, 64, 10) == [0]


@pytest.mark.parametrize("canvas,tile,stride", GRIDS)
def test_blending_weights_sum_correctly(canvas, tile, stride) -> None:
    grid = TileGrid(canvas, tile, stride)
    window = blend_window(grid)
    assert window.shape == tile and float(window.min()) > 0 and float(window.max()) <= 1
    total = weight_sum(grid)
    assert total.shape == canvas and float(total.min()) > 0
    # the normalised weights of the tiles covering a pixel add up to 1 everywhere
    tiler = Tiler(ConstantModel(1.0), grid)
    ones = tiler.stitch(torch.ones(grid.count, *tile))
    torch.testing.assert_close(ones, torch.ones(1, *canvas), atol=1e-6, rtol=0)


def test_regular_overlaps_are_a_partition_of_unity() -> None:
    """Neighbours at the regular stride cross-fade: their ramps add up to 1 without normalisation."""
    grid = TileGrid((96, 160), (64, 64), (32, 48))
    total = weight_sum(grid)
    inner = total[32:64, 16:144]  # away from the canvas border, where only one tile ramps down
    torch.testing.assert_close(inner, torch.ones_like(inner), atol=1e-6, rtol=0)


@pytest.mark.parametrize("canvas,tile,stride", GRIDS)
def test_stitching_a_constant_map_is_exact(canvas, tile, stride) -> None:
    grid = TileGrid(canvas, tile, stride)
    scores, maps = Tiler(ConstantModel(-3.25), grid)(torch.rand(2, 3, *canvas))
    torch.testing.assert_close(maps, torch.full((2, *canvas), -3.25), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, torch.full((2,), -3.25))


@pytest.mark.parametrize("canvas,tile,stride", GRIDS)
def test_a_per_pixel_model_reconstructs_the_canvas(canvas, tile, stride) -> None:
    grid = TileGrid(canvas, tile, stride)
    images = torch.rand(3, 3, *canvas, generator=torch.Generator().manual_seed(0))
    scores, maps = Tiler(MeanModel(), grid)(images)
    torch.testing.assert_close(maps, images.mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, images.mean(1).flatten(1).amax(1))  # the largest tile score


def test_chunked_eager_run_equals_one_batch() -> None:
    grid = TileGrid((100, 90), (32, 32), (24, 24))
    images = torch.rand(3, 3, 100, 90)
    one = Tiler(MeanModel(), grid, tile_batch=10_000)(images)
    chunked = Tiler(MeanModel(), grid, tile_batch=5)(images)
    for a, b in zip(one, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_cut_is_image_major() -> None:
    grid = TileGrid((4, 6), (2, 3), (2, 3))
    images = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
    tiles = cut(images, grid)
    assert tiles.shape == (2 * 4, 1, 2, 3)
    torch.testing.assert_close(tiles[5], images[1, :, 0:2, 3:6])  # image 1, tile 1 = (0, 3)


def test_traced_inference_module_tiles_any_batch_and_size() -> None:
    grid = TileGrid((48, 48), (32, 32), (16, 16))
    module = InferenceModule(MeanModel(), Calibrator(), (48, 48), grid).eval()
    traced = torch.jit.trace(module, torch.rand(2, 3, 48, 48), check_trace=False, strict=False)
    for shape in ((3, 3, 48, 48), (1, 3, 60, 40)):
        images = torch.rand(*shape)
        for a, b in zip(traced(images), module(images), strict=True):
            torch.testing.assert_close(a, b, equal_nan=True)  # uncalibrated: NaN
    assert module(torch.rand(1, 3, 60, 40)).anomaly_map.shape == (1, 48, 48)  # maps at the canvas size


def test_grid_errors_name_the_option() -> None:
    with pytest.raises(AdxDataError, match=r"--data.tile_size 128x128 is larger than the canvas"):
        make_grid(96, 128)
    with pytest.raises(AdxDataError, match=r"--data.tile_stride 0x0 must be between 1 and"):
        make_grid(96, 64, 0)
    with pytest.raises(AdxDataError, match=r"--data.tile_stride 80x80 must be between 1 and"):
        make_grid(96, 64, 80)
    with pytest.raises(AdxDataError, match=r"not a multiple of 16.*--data.tile_size 48 or 64"):
        check_tile_multiple(make_grid(96, 60), 16, "the largest stride")
    assert make_grid([96, 128], 64).stride == (48, 48)  # default stride: 3/4 of the tile
    assert make_grid(96, [32, 64], [16, 32]).tile == (32, 64)


def test_datamodule_options(tmp_path) -> None:
    from adx.data import Synthetic

    dm = Synthetic(root=str(tmp_path / "s"), image_size=96, tile_size=64, tile_stride=32)
    assert (
        dm.tiling == TileGrid((96, 96), (64, 64), (32, 32)) and dm.train_on_tiles and dm.tiles_per_image == 4
    )
    assert Synthetic(root=str(tmp_path / "s"), image_size=96).tiling is None
    off = Synthetic(root=str(tmp_path / "s"), image_size=96, tile_size=64, train_tiles=False)
    assert not off.train_on_tiles and off.tiles_per_image == 1
    with pytest.raises(AdxDataError, match="--data.tile_size too"):
        Synthetic(root=str(tmp_path / "s"), image_size=96, tile_stride=32)
    with pytest.raises(AdxDataError, match="larger than the canvas"):
        Synthetic(root=str(tmp_path / "s"), image_size=64, tile_size=96)


class Canvases(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.loads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.loads += 1
        image = torch.full((3, 8, 12), float(i))
        image[:, :, :] += torch.arange(12, dtype=torch.float32)  # column index in the fraction
        return {"image": image, "mask": torch.zeros(1, 8, 12), "label": 0, "path": f"/d/{i:03d}.png"}


def test_tile_dataset_and_keys() -> None:
    grid = TileGrid((8, 12), (4, 6), (4, 6))
    base = Canvases(3)
    tiles = TileDataset(base, grid)
    assert len(tiles) == 12
    item = tiles[5]  # image 1, tile 1 = (0, 6)
    assert item["path"] == tile_key("/d/001.png", 1) == "/d/001.png#t0001" and item["tile"] == 1
    torch.testing.assert_close(item["image"], base[1]["image"][:, 0:4, 6:12])
    base.loads = 0
    for i in range(len(tiles)):
        tiles[i]
    assert base.loads == 2  # images 0 and 2; image 1 was still cached
    for i in range(len(tiles)):
        tiles[i]
    assert base.loads == 2  # all three canvases were cached
    keys = [tiles[i]["path"] for i in range(len(tiles))]
    assert len(set(keys)) == 12 and keys == sorted(keys)  # distinct, and sorted order = image-major order


def test_shuffle_sampler_is_a_seeded_permutation_by_groups() -> None:
    sampler = TileShuffleSampler(n_images=20, tiles_per_image=6, seed=3, group=4)
    first = list(sampler)
    assert sorted(first) == list(range(120)) and len(sampler) == 120
    assert first == list(sampler)  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != first
    for start in range(0, 120, 24):  # every run of 4 images' tiles comes from 4 images only
        assert len({i // 6 for i in first[start : start + 24]}) == 4


def test_cut_batch() -> None:
    grid = TileGrid((8, 8), (4, 4), (4, 4))
    batch = {
        "image": torch.rand(2, 3, 8, 8),
        "mask": torch.rand(2, 1, 8, 8),
        "label": torch.tensor([0, 1]),
        "path": ["a.png", "b.png"],
        "defect_type": ["good", "scratch"],
    }
    tiles = cut_batch(batch, grid)
    assert tiles["image"].shape == (8, 3, 4, 4) and tiles["mask"].shape == (8, 1, 4, 4)
    assert tiles["label"].tolist() == [0] * 4 + [1] * 4
    assert tiles["path"][4] == "b.png#t0000" and tiles["defect_type"][7] == "scratch"
