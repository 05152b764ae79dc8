"""Unit tests for adx.data: listers, dataset, datamodules, synthetic generator and error messages."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image
from torch.utils.data import DataLoader

from adx.data import (
    AdxDataError,
    AnomalyDataModule,
    AnomalyDataset,
    Folder,
    GoodNG,
    MVTec,
    Sample,
    Synthetic,
    check_samples,
    list_folder,
    list_goodng,
    list_mvtec,
    make_synthetic,
)
from adx.models.components.input_size import input_sizes


def _img(path: Path, size: tuple[int, int] = (32, 24), mode: str = "L", value: int = 128) -> Path:
    """Write a constant image of ``size`` (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode in ("L", "I;16") else (value,) * len(mode)
    Image.new(mode, size, color).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (32, 24)) -> Path:
    """Write a 0/255 mask with a small foreground square."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    arr[2:6, 2:6] = 255
    Image.fromarray(arr).save(path)
    return path


def _mvtec_tree(root: Path) -> Path:
    """A tiny MVTec category: 3 train, 2 test good, 2 scratch (masked), 1 logical (no ground_truth)."""
    cat = root / "widget"
    for i in range(3):
        _img(cat / "train/good" / f"{i:03d}.png")
    for i in range(2):
        _img(cat / "test/good" / f"{i:03d}.png")
    _img(cat / "test/scratch/000.png")
    _img(cat / "test/scratch/001.png")
    _mask(cat / "ground_truth/scratch/000_mask.png")
    _mask(cat / "ground_truth/scratch/001.png")  # plain-stem mask is accepted too
    _img(cat / "test/logical/000.png")
    (cat / "sources.csv").write_text("a,b\n")
    (cat / "train/good/notes.txt").write_text("ignored")
    (root / "other" / "train").mkdir(parents=True)
    return cat


# --- listers -----------------------------------------------------------------------------------------------------
def test_list_mvtec_tree(tmp_path: Path) -> None:
    cat = _mvtec_tree(tmp_path)
    samples = list_mvtec(tmp_path, "widget")
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(train) == 3 and all(s.label == 0 for s in train)
    assert sorted((s.defect_type, s.label) for s in test) == [
        ("good", 0),
        ("good", 0),
        ("logical", 1),
        ("scratch", 1),
        ("scratch", 1),
    ]
    masks = {Path(s.image_path).name: s.mask_path for s in test if s.defect_type == "scratch"}
    assert masks == {
        "000.png": str(cat / "ground_truth/scratch/000_mask.png"),
        "001.png": str(cat / "ground_truth/scratch/001.png"),
    }
    assert next(s for s in test if s.defect_type == "logical").mask_path is None
    check_samples(samples)


def test_list_mvtec_missing_root_mentions_cli_and_env(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(AdxDataError, match="nope") as err:
        list_mvtec(missing, "widget")
    assert "--data.root" in str(err.value) and "ADX_DATA_ROOT" in str(err.value)


def test_list_mvtec_unknown_category_lists_available(tmp_path: Path) -> None:
    _mvtec_tree(tmp_path)
    with pytest.raises(AdxDataError, match="gadget") as err:
        list_mvtec(tmp_path, "gadget")
    assert "widget" in str(err.value) and "other" in str(err.value)


def test_list_mvtec_empty_train_names_folder(tmp_path: Path) -> None:
    (tmp_path / "widget/train/good").mkdir(parents=True)
    with pytest.raises(AdxDataError, match=r"train[/\\]good"):
        list_mvtec(tmp_path, "widget")


def test_list_mvtec_missing_mask_names_image(tmp_path: Path) -> None:
    cat = _mvtec_tree(tmp_path)
    _img(cat / "test/scratch/002.png")
    with pytest.raises(AdxDataError, match=r"scratch[/\\]002\.png"):
        list_mvtec(tmp_path, "widget")


def test_list_folder_split_and_masks(tmp_path: Path) -> None:
    for i in range(10):
        _img(tmp_path / "ok" / f"n{i}.jpg")
    _img(tmp_path / "bad_a/a0.png")
    _img(tmp_path / "bad_b/b0.bmp")
    _mask(tmp_path / "masks/bad_a/a0_mask.png")  # per-defect mask folder
    _mask(tmp_path / "masks/b0.png")  # flat mask folder
    kwargs = dict(normal_dir="ok", abnormal_dirs=["bad_a", "bad_b"], mask_dir="masks", normal_test_dir=None)
    samples = list_folder(tmp_path, normal_split_ratio=0.3, seed=1, **kwargs)
    assert samples == list_folder(tmp_path, normal_split_ratio=0.3, seed=1, **kwargs)  # seeded
    assert samples != list_folder(tmp_path, normal_split_ratio=0.3, seed=2, **kwargs)
    train = [s for s in samples if s.split == "train"]
    test_good = [s for s in samples if s.split == "test" and s.label == 0]
    bad = {s.defect_type: s.mask_path for s in samples if s.label == 1}
    assert (len(train), len(test_good)) == (7, 3)
    assert not {s.image_path for s in train} & {s.image_path for s in test_good}
    assert bad == {
        "bad_a": str(tmp_path / "masks/bad_a/a0_mask.png"),
        "bad_b": str(tmp_path / "masks/b0.png"),
    }


def test_list_folder_normal_test_dir_and_errors(tmp_path: Path) -> None:
    for i in range(4):
        _img(tmp_path / "ok" / f"n{i}.png")
    _img(tmp_path / "ok_test/t0.png")
    _img(tmp_path / "ng/x.png")
    samples = list_folder(tmp_path, "ok", ["ng"], None, "ok_test", 0.5, 0)
    assert sum(s.split == "train" for s in samples) == 4
    assert [Path(s.image_path).name for s in samples if s.split == "test"] == ["t0.png", "x.png"]
    with pytest.raises(AdxDataError, match="missing_dir") as err:
        list_folder(tmp_path, "ok", ["missing_dir"], None, "ok_test", 0.5, 0)
    assert "abnormal_dirs" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdxDataError, match="empty"):
        list_folder(tmp_path, "empty", [], None, None, 0.2, 0)
    (tmp_path / "masks").mkdir()
    with pytest.raises(AdxDataError, match=r"ng[/\\]x\.png"):
        list_folder(tmp_path, "ok", ["ng"], "masks", None, 0.2, 0)


def test_list_goodng(tmp_path: Path) -> None:
    for i in range(3):
        _img(tmp_path / "train/good" / f"{i}.png")
    _img(tmp_path / "test/good/g.png")
    _img(tmp_path / "test/ng/a.png")
    _img(tmp_path / "test/ng_scratch/b.png")
    _mask(tmp_path / "test/ng_scratch_mask/b_mask.png")
    _img(tmp_path / "test/ng_dent/c.png")
    _mask(tmp_path / "ground_truth/ng_dent/c.png")
    samples = list_goodng(tmp_path)
    bad = {s.defect_type: s.mask_path for s in samples if s.label == 1}
    assert bad == {
        "ng": None,
        "ng_dent": str(tmp_path / "ground_truth/ng_dent/c.png"),
        "ng_scratch": str(tmp_path / "test/ng_scratch_mask/b_mask.png"),
    }
    assert sum(s.split == "train" for s in samples) == 3
    _img(tmp_path / "test/ng_scratch/d.png")  # mask folder exists but no mask for d
    with pytest.raises(AdxDataError, match=r"d\.png"):
        list_goodng(tmp_path)
    (tmp_path / "test/ng_scratch/d.png").unlink()
    _img(tmp_path / "test/weird/e.png")
    with pytest.raises(AdxDataError, match="weird"):
        list_goodng(tmp_path)


# --- checks and dataset ------------------------------------------------------------------------------------------
def test_check_samples_mask_size_mismatch_and_corrupt_header(tmp_path: Path) -> None:
    img = _img(tmp_path / "a.png", (32, 24))
    mask = _mask(tmp_path / "a_mask.png", (16, 24))
    with pytest.raises(AdxDataError, match="a_mask.png"):
        check_samples([Sample(str(img), 1, "test", "x", str(mask))])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(AdxDataError, match="broken.png"):
        check_samples([Sample(str(bad), 0, "train")])
    check_samples([Sample(str(bad), 0, "train")], verify_images=False)  # existence only
    with pytest.raises(AdxDataError, match="gone.png"):
        check_samples([Sample(str(tmp_path / "gone.png"), 0, "train")], verify_images=False)


def test_mask_stays_aligned_after_resize(tmp_path: Path) -> None:
    img = np.zeros((100, 80), dtype=np.uint8)
    img[20:60, 40:80] = 255
    Image.fromarray(img).save(tmp_path / "x.png")
    Image.fromarray(img).save(tmp_path / "x_mask.png")
    sample = Sample(str(tmp_path / "x.png"), 1, "test", "d", str(tmp_path / "x_mask.png"))
    item = AnomalyDataset([sample], (50, 40))[0]
    expected = torch.zeros(50, 40)
    expected[10:30, 20:40] = 1
    assert torch.equal(item["mask"][0], expected)
    assert item["image"][:, 11:29, 21:39].min() > 0.99 and item["image"][:, :9].max() < 0.01
    # the (antialiased) image and the mask have the same centre of mass, so they are not shifted
    ys, xs = torch.meshgrid(torch.arange(50.0), torch.arange(40.0), indexing="ij")
    gray = item["image"][0]
    centre = torch.stack([(gray * ys).sum(), (gray * xs).sum()]) / gray.sum()
    assert torch.allclose(centre, torch.tensor([19.5, 29.5]), atol=0.05)
    # non-integer scale: a mask pixel is set iff its centre maps inside the original square (no half-pixel shift)
    item = AnomalyDataset([sample], 37)[0]
    rows = ((torch.arange(37) + 0.5) * 100 / 37).floor()
    cols = ((torch.arange(37) + 0.5) * 80 / 37).floor()
    inside = ((rows >= 20) & (rows < 60))[:, None] & ((cols >= 40) & (cols < 80))[None, :]
    assert torch.equal(item["mask"][0] > 0, inside)
    bright = item["image"][0] > 0.5
    iou = (bright & (item["mask"][0] > 0)).sum() / (bright | (item["mask"][0] > 0)).sum()
    assert iou > 0.85
    assert item["orig_size"].tolist() == [100, 80] and item["has_mask"] is True


def test_mixed_sizes_collate_and_channel_handling(tmp_path: Path) -> None:
    samples = [
        Sample(str(_img(tmp_path / "gray.png", (40, 30), "L", 100)), 0, "train"),
        Sample(str(_img(tmp_path / "rgba.png", (17, 53), "RGBA", 200)), 0, "train"),
        Sample(str(_img(tmp_path / "rgb.jpg", (64, 64), "RGB", 50)), 0, "train"),
    ]
    arr16 = np.full((20, 20), 32768, dtype=np.uint16)
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    samples.append(Sample(str(tmp_path / "deep.png"), 0, "train"))
    batch = next(iter(DataLoader(AnomalyDataset(samples, (24, 32)), batch_size=4)))
    assert batch["image"].shape == (4, 3, 24, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 1, 24, 32) and batch["mask"].sum() == 0
    assert batch["orig_size"].tolist() == [[30, 40], [53, 17], [64, 64], [20, 20]]
    assert batch["has_mask"].tolist() == [False] * 4 and batch["label"].tolist() == [0] * 4
    gray = batch["image"][0]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[0], gray[2])
    assert abs(gray.mean().item() - 100 / 255) < 1e-3
    assert abs(batch["image"][3].mean().item() - 0.5) < 1e-3  # 16-bit scaled by 65535


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_resize_matches_float_reference(tmp_path: Path, suffix: str) -> None:
    from adx.data.dataset import _resize_array, _to_rgb_array, load_image

    rng = np.random.default_rng(1)
    ramp = np.add.outer(np.linspace(0, 200, 600), np.linspace(0, 55, 800))[..., None]
    pixels = (ramp + rng.normal(0, 4, (600, 800, 3))).clip(0, 255).astype(np.uint8)
    path = tmp_path / f"big{suffix}"
    Image.fromarray(pixels).save(path, **({"quality": 95} if suffix == ".jpg" else {}))
    with Image.open(path) as img:
        full = _to_rgb_array(img)
    for size in ((96, 128), (480, 640), (700, 900)):  # 6x and 1.25x down, and up: one path for all
        image, orig = load_image(str(path), size)
        assert orig == (600, 800) and image.shape == (*size, 3) and image.dtype == np.float32
        assert np.abs(image - _resize_array(full, size)).max() <= 1.01 / 255  # 8-bit arithmetic: <= 1 level
    same, orig = load_image(str(path))
    assert orig == (600, 800) and np.array_equal(same, full)


def test_corrupt_image_mid_run_names_path(tmp_path: Path) -> None:
    path = tmp_path / "trunc.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])  # header intact, pixel data truncated
    sample = Sample(str(path), 0, "train")
    check_samples([sample])  # the cheap header check passes
    with pytest.raises(AdxDataError, match="trunc.png"):
        AnomalyDataset([sample], 32)[0]


# --- synthetic ---------------------------------------------------------------------------------------------------
def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_synthetic_deterministic_and_cached(tmp_path: Path) -> None:
    a = make_synthetic(tmp_path / "a")
    b = make_synthetic(tmp_path / "b")
    files = _tree_bytes(a)
    assert files == _tree_bytes(b) and len(files) == 40 + 10 + 20 + 20
    c = make_synthetic(tmp_path / "c", seed=1)
    assert _tree_bytes(c) != files
    stamps = {p: p.stat().st_mtime_ns for p in a.rglob("*.png")}
    make_synthetic(a)  # cached: no file is rewritten
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*.png")} == stamps
    make_synthetic(a, n_train=5)  # different parameters: regenerated
    assert len(list((a / "train/good").iterdir())) == 5


def test_synthetic_masks_cover_defects(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "s", n_train=1, n_test_good=0, n_test_bad=6, size=64)
    samples = list_mvtec(root.parent, root.name)
    check_samples(samples)
    for s in samples:
        if s.label == 1:
            mask = np.asarray(Image.open(s.mask_path))
            assert set(np.unique(mask)) == {0, 255}
            assert 0 < (mask > 0).mean() < 0.3


def test_synthetic_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine/train").mkdir(parents=True)
    with pytest.raises(AdxDataError, match="mine"):
        make_synthetic(tmp_path / "mine")


# --- datamodules -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(
        tmp_path_factory.mktemp("synth") / "demo", n_train=20, n_test_good=10, n_test_bad=10, size=48
    )


def _dm(root: Path, **kwargs: object) -> Synthetic:
    return Synthetic(
        root=str(root),
        n_train=20,
        n_test_good=10,
        n_test_bad=10,
        size=48,
        image_size=32,
        num_workers=0,
        **kwargs,
    )


def test_val_train_split_is_normal_and_disjoint(synth_root: Path) -> None:
    dm = _dm(synth_root, val_ratio=0.25)
    dm.setup("fit")
    assert len(dm.val_samples) == 5 and len(dm.train_samples) == 15
    assert all(s.label == 0 and s.split == "train" for s in dm.val_samples)
    assert not set(dm.val_samples) & set(dm.train_samples) and not dm.val_has_anomalies
    assert len(dm.test_samples) == 20


def test_val_test_split_is_stratified_and_removed_from_test(synth_root: Path) -> None:
    dm = _dm(synth_root, val_source="test_split", val_ratio=0.3, seed=3)
    dm.setup("fit")
    assert not set(dm.val_samples) & set(dm.test_samples)
    assert len(dm.val_samples) + len(dm.test_samples) == 20 and len(dm.train_samples) == 20
    assert sorted(s.label for s in dm.val_samples) == [0, 0, 0, 1, 1, 1] and dm.val_has_anomalies
    other = _dm(synth_root, val_source="test_split", val_ratio=0.3, seed=3)
    other.setup("fit")
    assert other.val_samples == dm.val_samples


def test_val_test_warns_and_none_disables(synth_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dm = _dm(synth_root, val_source="test")
    dm.setup("fit")
    assert dm.val_samples == dm.test_samples and "WARNING" in capsys.readouterr().out
    dm = _dm(synth_root, val_source="none")
    dm.setup("fit")
    assert dm.val_samples == [] and dm.val_dataloader() == [] and len(dm.train_samples) == 20
    out = capsys.readouterr().out
    assert out.count("[adx.data]") == 1 and "train 20" in out


def test_datamodule_loaders(synth_root: Path) -> None:
    dm = _dm(synth_root, batch_size=7, eval_batch_size=9)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b["path"]) for b in batches] == [7, 7, 4]  # drop_last=False
    assert batches[0]["image"].shape == (7, 3, 32, 32)
    test = next(iter(dm.test_dataloader()))
    assert len(test["path"]) == 9 and test["path"] == [s.image_path for s in dm.test_samples[:9]]
    assert dm.name == "synthetic" and dm.category == "demo"


def test_held_out_normal_loader_prefers_normal_validation_images(synth_root: Path) -> None:
    dm = _dm(synth_root, val_source="test_split", val_ratio=0.3, seed=3)
    dm.setup("fit")
    loader, what = dm.held_out_normal_dataloader()
    paths = [p for batch in loader for p in batch["path"]]
    assert what == "held-out normal images"
    assert paths == [s.image_path for s in dm.val_samples if s.label == 0] and len(paths) == 3
    dm = _dm(synth_root, val_source="none")
    dm.setup("fit")
    loader, what = dm.held_out_normal_dataloader()
    assert what == "training images"
    assert [p for batch in loader for p in batch["path"]] == [s.image_path for s in dm.train_samples]


def test_input_sizes_name_every_size_and_its_flag() -> None:
    grid = SimpleNamespace(tile=(64, 48))
    assert input_sizes(SimpleNamespace(image_size=(128, 96), tiling=None)) == [
        ((128, 96), "--data.image_size")
    ]
    tiled = SimpleNamespace(image_size=(256, 192), tiling=grid, train_on_tiles=True)
    assert input_sizes(tiled) == [((64, 48), "--data.tile_size")]
    tiled.train_on_tiles = False  # training sees whole images, inference the tiles
    assert input_sizes(tiled) == [((64, 48), "--data.tile_size"), ((256, 192), "--data.image_size")]
    assert input_sizes(SimpleNamespace(image_size=None, tiling=None)) == []


def test_predict_path_without_dataset_root(tmp_path: Path, synth_root: Path) -> None:
    dm = MVTec(
        root=str(tmp_path / "no_such_root"), category="x", path=str(synth_root / "test"), num_workers=0
    )
    dm.setup("predict")
    assert len(dm.predict_samples) == 20 and {s.label for s in dm.predict_samples} == {-1}
    assert all(s.split == "predict" for s in dm.predict_samples)
    one = MVTec(category="x", path=str(synth_root / "test/good/000.png"), num_workers=0)
    one.setup("predict")
    assert len(one.predict_dataloader().dataset) == 1
    with pytest.raises(AdxDataError, match="missing.png"):
        MVTec(category="x", path=str(tmp_path / "missing.png")).setup("predict")
    dm = _dm(synth_root)
    dm.setup("predict")
    assert dm.predict_samples == dm.test_samples


def test_mvtec_name_root_env_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _mvtec_tree(tmp_path / "My_Set")
    monkeypatch.setenv("ADX_DATA_ROOT", str(tmp_path / "My_Set"))
    dm = MVTec(category="widget", val_source="none", image_size=16)
    assert dm.name == "my_set" and dm.category == "widget"
    dm.setup("test")
    assert len(dm.test_samples) == 5
    monkeypatch.delenv("ADX_DATA_ROOT")
    with pytest.raises(AdxDataError, match="ADX_DATA_ROOT"):
        MVTec(category="widget").setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"val_ratio": 0.0}, "val_ratio"),
        ({"val_ratio": 1.5}, "val_ratio"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": (32, -1)}, "image_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_values_raise(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(AdxDataError, match=key):
        MVTec(root="/x", **kwargs)


def test_folder_and_goodng_datamodules(tmp_path: Path) -> None:
    for i in range(10):
        _img(tmp_path / "f/good" / f"{i}.png")
    _img(tmp_path / "f/ng/a.png")
    dm = Folder(root=str(tmp_path / "f"), abnormal_dirs=["ng"], image_size=16, num_workers=0)
    dm.setup("fit")
    assert (dm.name, dm.category) == ("folder", "custom")
    assert len(dm.train_samples) + len(dm.val_samples) == 8 and len(dm.test_samples) == 3
    with pytest.raises(AdxDataError, match="normal_split_ratio"):
        Folder(root=str(tmp_path / "f"), normal_split_ratio=1.0)
    train_only = Folder(root=str(tmp_path / "f"), normal_split_ratio=0.0, val_source="none", num_workers=0)
    train_only.setup("test")  # no error in setup: the CLI checks test_samples to skip testing
    assert train_only.test_samples == [] and len(train_only.train_samples) == 10
    with pytest.raises(AdxDataError, match="no images for stage 'test'"):
        train_only.test_dataloader()
    for i in range(3):
        _img(tmp_path / "line3/train/good" / f"{i}.png")
    _img(tmp_path / "line3/test/ng/a.png")
    gn = GoodNG(root=str(tmp_path / "line3"), val_source="none", image_size=16)
    gn.setup("fit")
    assert (gn.name, gn.category, len(gn.test_samples)) == ("goodng", "line3", 1)


def test_jsonargparse_exposes_base_params(tmp_path: Path) -> None:
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalyDataModule, "data")
    cfg = parser.parse_args(
        [
            "--data=adx.data.Synthetic",
            f"--data.root={tmp_path / 'syn'}",
            "--data.image_size=[24, 40]",
            "--data.val_source=test_split",
            "--data.num_workers=0",
        ]
    )
    assert cfg.data.init_args.batch_size == 16 and cfg.data.init_args.n_train == 40
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, Synthetic) and dm.image_size == (24, 40) and dm.val_source == "test_split"
    for cls in (MVTec, Folder, GoodNG, Synthetic):
        p = ArgumentParser()
        p.add_class_arguments(cls, "data")
        dests = {a.dest for a in p._actions}
        assert {
            "data.image_size",
            "data.batch_size",
            "data.val_source",
            "data.verify_images",
            "data.root",
        } <= dests
