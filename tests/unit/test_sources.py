"""Offline data sources: Perlin anomalies, texture and natural-image pools, their fallback order."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adx.models.components import sources
from adx.models.components.sources import (
    NaturalImages,
    PerlinAnomaly,
    SourceError,
    SourceImageError,
    TextureSource,
    perlin_mask,
    perlin_noise,
    procedural_image,
    read_image,
    texture_augment,
)
from adx.models.components.sources import images as images_module
from adx.models.components.sources.augment import TRANSFORMS

SIZES = [(64, 64), (200, 400), (97, 131)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write_images(folder: Path, n: int = 3, size: tuple[int, int] = (40, 56)) -> list[Path]:
    """n small RGB PNGs (one in a subfolder) under folder."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / ("sub" if i == 0 else "") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend scikit-image is not installed."""
    monkeypatch.setattr(images_module, "package_image_files", lambda: None)


@pytest.fixture
def fake_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Pretend an installed package ships the images of a temporary folder."""
    folder = tmp_path / "pkgdata"
    files = write_images(folder, n=4)
    monkeypatch.setattr(
        images_module, "package_image_files", lambda: ("fakepkg", "9.9", folder, sorted(files))
    )
    return folder


# --- noise and masks ----------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", SIZES)
@pytest.mark.parametrize("angle", [0.0, 37.0])
def test_perlin_noise_any_size(h: int, w: int, angle: float) -> None:
    noise = perlin_noise(h, w, (4, 2), gen(), angle=angle, channels=2)
    assert noise.shape == (2, h, w) and torch.isfinite(noise).all()
    assert noise.abs().max() <= 1.0 + 1e-5 and noise.std() > 0.05


@pytest.mark.parametrize("h, w", SIZES)
def test_perlin_mask_binary_and_seeded(h: int, w: int) -> None:
    mask = perlin_mask(h, w, gen(3))
    assert mask.shape == (1, h, w) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask, perlin_mask(h, w, gen(3)))
    masks = torch.stack([perlin_mask(h, w, gen(s)) for s in range(8)])
    assert masks.any() and not masks.all() and len({m.sum().item() for m in masks}) > 1


def test_perlin_mask_checks_scale() -> None:
    with pytest.raises(ValueError, match="exponents"):
        perlin_mask(32, 32, gen(), scale=(3, 3))


def test_procedural_image_range() -> None:
    for seed in range(4):
        image = procedural_image(97, 131, gen(seed))
        assert image.shape == (3, 97, 131) and image.min() >= 0 and image.max() <= 1 and image.std() > 0.01
    assert torch.equal(procedural_image(50, 60, gen(1)), procedural_image(50, 60, gen(1)))


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t.__name__)
def test_texture_transforms_keep_shape_and_range(transform) -> None:
    x = torch.rand(3, 33, 47, generator=gen())
    y = transform(x, gen()).clamp(0, 1)
    assert y.shape == x.shape and torch.isfinite(y).all()
    out = texture_augment(x, gen())
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


# --- PerlinAnomaly ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anomaly() -> PerlinAnomaly:
    return PerlinAnomaly(p_anomaly=0.5)


@pytest.mark.parametrize("h, w", SIZES)
def test_anomaly_shapes_ranges_labels(anomaly: PerlinAnomaly, h: int, w: int) -> None:
    image = torch.rand(3, h, w, generator=gen(1))
    labels = []
    for seed in range(12):
        out = anomaly(image, gen(seed))
        assert out.image.shape == (3, h, w) and out.mask.shape == (1, h, w)
        assert out.image.min() >= 0 and out.image.max() <= 1
        assert set(out.mask.unique().tolist()) <= {0.0, 1.0}
        assert out.label in (0, 1)
        if out.label:
            assert out.mask.sum() > 0
            outside = out.mask[0] == 0
            assert torch.equal(out.image[:, outside], image[:, outside])  # only the mask changes
            assert not torch.equal(out.image, image)
        else:
            assert out.mask.sum() == 0 and torch.equal(out.image, image)
        labels.append(out.label)
    assert 0 < sum(labels) < len(labels)  # both kinds appear at p_anomaly = 0.5


def test_anomaly_reproducible_with_seed(anomaly: PerlinAnomaly) -> None:
    image = torch.rand(3, 97, 131, generator=gen(2))
    for seed in range(4):
        a, b = anomaly(image, gen(seed)), anomaly(image, seed)  # an int seeds a fresh generator too
        assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and a.label == b.label
    outs = [anomaly(image, gen(s)) for s in range(6)]
    assert len({o.mask.sum().item() for o in outs}) > 1


def test_anomaly_probability_extremes(anomaly: PerlinAnomaly) -> None:
    image = torch.rand(3, 48, 64, generator=gen())
    always = PerlinAnomaly(anomaly.source, p_anomaly=1.0)
    never = PerlinAnomaly(anomaly.source, p_anomaly=0.0)
    assert all(always(image, gen(s)).label == 1 for s in range(10))
    assert all(never(image, gen(s)).label == 0 for s in range(10))


def test_anomaly_grayscale_input_and_opacity(anomaly: PerlinAnomaly) -> None:
    image = torch.full((1, 40, 50), 0.5)
    out = PerlinAnomaly(anomaly.source, p_anomaly=1.0)(image, gen())
    assert out.image.shape == (1, 40, 50) and out.label == 1
    opaque = PerlinAnomaly(anomaly.source, p_anomaly=1.0, opacity=(1.0, 1.0))(image, gen(5))
    assert not torch.isclose(opaque.image[0][opaque.mask[0] > 0], torch.tensor(0.5)).all()
    with pytest.raises(ValueError, match="C = 1 or 3"):
        anomaly(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="opacity"):
        PerlinAnomaly(anomaly.source, opacity=(0.5, 1.5))


def test_anomaly_provenance_is_json_and_pickles(anomaly: PerlinAnomaly) -> None:
    record = json.loads(json.dumps(anomaly.describe()))
    assert record["method"] == "perlin" and record["textures"]["role"] == "textures"
    copy = pickle.loads(pickle.dumps(anomaly))  # DataLoader workers get a pickled copy
    image = torch.rand(3, 32, 32)
    assert torch.equal(copy(image, gen(4)).image, anomaly(image, gen(4)).image)


# --- sources: fallback order, errors, provenance ----------------------------------------------


def test_folder_beats_package(tmp_path: Path, fake_package: Path) -> None:
    write_images(tmp_path / "dtd", n=5)
    source = TextureSource(tmp_path / "dtd")
    record = source.provenance()
    assert record["kind"] == "folder" and record["name"] == str((tmp_path / "dtd").resolve())
    assert record["num_files"] == 5 and record["version"] is None
    assert TextureSource().provenance()["kind"] == "package"


def test_package_beats_procedural(fake_package: Path) -> None:
    for source in (TextureSource(), NaturalImages(size=32)):
        record = source.describe()
        assert (record["kind"], record["name"], record["version"], record["num_files"]) == (
            "package",
            "fakepkg",
            "9.9",
            4,
        )
    assert TextureSource().sample((30, 20), gen()).shape == (3, 30, 20)


def test_procedural_when_nothing_else(no_package: None) -> None:
    with pytest.warns(UserWarning, match="procedural"):
        texture, natural = TextureSource(), NaturalImages(size=(31, 45))
    for source in (texture, natural):
        record = source.provenance()
        assert record["kind"] == "procedural" and record["num_files"] == 0 and record["files_sha256"] is None
    assert texture.sample((31, 45), gen()).shape == (3, 31, 45)
    assert natural[0].shape == (3, 31, 45)
    image = torch.rand(3, 31, 45)
    out = PerlinAnomaly(texture, p_anomaly=1.0)(image, gen())
    assert out.label == 1


@pytest.mark.skipif(sources.package_image_files() is None, reason="scikit-image is not installed")
def test_real_package_photographs_without_import() -> None:
    imported = "skimage" in sys.modules
    name, version, folder, files = sources.package_image_files()
    assert name == "scikit-image" and version and len(files) >= 3
    assert {"brick.png", "grass.png", "gravel.png"} <= {f.name for f in files}
    assert all(f.is_file() and f.parent == folder for f in files)
    if not imported:
        assert "skimage" not in sys.modules  # listed on disk, scikit-image never imported (no pooch)
    assert TextureSource().provenance()["kind"] == "package"


def test_missing_folder_error_names_folder_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dtd"
    with pytest.raises(SourceError, match="does not exist") as info:
        TextureSource(missing)
    assert str(missing) in str(info.value) and "pass an existing folder" in str(info.value)
    with pytest.raises(SourceError, match="does not exist"):
        NaturalImages(missing)
    afile = tmp_path / "file.png"
    afile.write_bytes(b"")
    with pytest.raises(SourceError, match="is a file"):
        TextureSource(afile)


def test_empty_folder_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "deep").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"")
    with pytest.raises(SourceError, match="holds no images") as info:
        NaturalImages(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value) and "leave the folder unset" in str(info.value)


def test_provenance_hash_follows_file_list(tmp_path: Path) -> None:
    write_images(tmp_path / "a", n=3)
    first = TextureSource(tmp_path / "a").provenance()
    assert first == TextureSource(tmp_path / "a").provenance()
    assert json.loads(json.dumps(first)) == first
    write_images(tmp_path / "b", n=3)
    assert TextureSource(tmp_path / "b").provenance()["files_sha256"] == first["files_sha256"]  # same names
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "extra.png")
    assert TextureSource(tmp_path / "a").provenance()["files_sha256"] != first["files_sha256"]


def test_read_image_modes_and_corrupt_file(tmp_path: Path) -> None:
    Image.new("L", (9, 7), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (9, 7), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((7, 9), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    for name in ("gray.png", "rgba.png", "deep.png"):
        image = read_image(tmp_path / name)
        assert image.shape == (3, 7, 9) and image.dtype == torch.uint8
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    source = TextureSource(tmp_path)
    index = [f.name for f in source.files].index("broken.jpg")
    with pytest.raises(SourceImageError, match="broken.jpg"):
        source.load(index)


# --- NaturalImages ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(200, 400), (97, 131)])
def test_natural_images_dataset_and_iterator(tmp_path: Path, size: tuple[int, int]) -> None:
    write_images(tmp_path, n=3, size=(120, 90))
    images = NaturalImages(tmp_path, size=size, length=5, seed=1)
    assert len(images) == 5
    item = images[2]
    assert item.shape == (3, *size) and item.min() >= 0 and item.max() <= 1
    assert torch.equal(item, NaturalImages(tmp_path, size=size, length=5, seed=1)[2])  # seeded per index
    assert not torch.equal(item, NaturalImages(tmp_path, size=size, length=5, seed=2)[2])
    stream = iter(images)
    firsts = [next(stream) for _ in range(7)]  # infinite: goes past length
    assert torch.equal(firsts[2], item) and firsts[6].shape == (3, *size)
    with pytest.raises(IndexError):
        images[5]


def test_natural_images_in_a_dataloader(tmp_path: Path) -> None:
    write_images(tmp_path, n=2)
    images = NaturalImages(tmp_path, size=32, length=6, grayscale=1.0)
    batch = next(iter(torch.utils.data.DataLoader(images, batch_size=4)))
    assert batch.shape == (4, 3, 32, 32)
    assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 1], batch[:, 2])  # grey
