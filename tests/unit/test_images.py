"""Image and mask decoding on real files of each kind: bit depths, float TIFF, EXIF orientation, palettes,
label masks and the single resize path (adx.data.dataset)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from adx import imageio
from adx.data import AdxDataError, AdxDataWarning, AnomalyDataset, MVTec, Sample, check_samples
from adx.data import dataset as ds
from adx.data.dataset import _resize_array, _to_rgb_array, load_image, load_mask

GREY = 1 / 255


@pytest.fixture(autouse=True)
def _fresh_low_bits_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 12-bit-in-16 warning is once per process; every test starts as a fresh process would."""
    monkeypatch.setattr(imageio, "_low_bits_warned", False)


def _save16(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr.astype(np.uint16)).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I;16"), img.mode  # really a 16-bit file
    return path


# --- bit depth -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_full_range(tmp_path: Path, suffix: str) -> None:
    arr = np.array([[0, 16384, 32768, 65535]] * 4)
    path = _save16(tmp_path / f"full{suffix}", arr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # values above 4095: no 12-bit warning
        image, orig = load_image(str(path))
    assert orig == (4, 4) and image.shape == (4, 4, 3)
    np.testing.assert_allclose(image[0, :, 0], arr[0] / 65535, atol=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_twelve_bit_in_sixteen(tmp_path: Path, suffix: str) -> None:
    arr = np.array([[0, 1024, 2048, 4095]] * 4)
    path = _save16(tmp_path / f"camera12{suffix}", arr)
    with pytest.warns(AdxDataWarning, match=rf"camera12\{suffix}.*--data\.bit_depth 12"):
        dark, _ = load_image(str(path))
    assert dark.max() < 0.07  # auto = the container's range: 4095 / 65535
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicit bit depth: no warning
        image, _ = load_image(str(path), bit_depth=12)
    np.testing.assert_allclose(image[0, :, 0], arr[0] / 4095, atol=1e-6)
    too_bright = _save16(tmp_path / f"hot{suffix}", np.array([[0, 5000]]))
    with pytest.raises(AdxDataError, match=rf"hot\{suffix}.*5000.*4095.*--data\.bit_depth") as err:
        load_image(str(too_bright), bit_depth=12)
    assert "failed to decode" not in str(err.value)  # our own message, not wrapped twice


def test_low_bits_warning_once_per_process_and_dataset_option(tmp_path: Path) -> None:
    paths = [_save16(tmp_path / f"{i}.png", np.full((8, 8), 1000 + i)) for i in range(3)]
    samples = [Sample(str(p), 0, "train") for p in paths]
    with pytest.warns(AdxDataWarning) as record:
        for item in AnomalyDataset(samples, 8):
            assert item["image"].max() < 0.02
    assert len([w for w in record if issubclass(w.category, AdxDataWarning)]) == 1
    assert "0.png" in str(record[0].message) and "bit_depth 10" in str(record[0].message)
    item = AnomalyDataset(samples, 4, bit_depth=10)[0]
    assert torch.allclose(item["image"], torch.full((3, 4, 4), 1000 / 1023))


def test_mode_i_tiff_is_a_sixteen_bit_container(tmp_path: Path) -> None:
    ok = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 65535]] * 2, dtype=np.int32)).save(ok)
    with Image.open(ok) as img:
        assert img.mode == "I"
    np.testing.assert_allclose(load_image(str(ok))[0][0, :, 0], [0.0, 1.0])
    big = tmp_path / "big.tif"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(big)
    with pytest.raises(AdxDataError, match=r"big\.tif.*0\.\.65535"):
        load_image(str(big))


@pytest.mark.parametrize("bad", ["twelve", 7, 17, True, 12.0])
def test_bad_bit_depth_is_named(bad: object) -> None:
    with pytest.raises(AdxDataError, match="bit_depth"):
        MVTec(root="/x", bit_depth=bad)
    with pytest.raises(AdxDataError, match="--data.bit_depth"):
        AnomalyDataset([], 8, bit_depth=bad)


def test_eight_bit_images_ignore_bit_depth(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.new("L", (4, 4), 51).save(path)
    assert np.allclose(load_image(str(path), bit_depth=12)[0], 0.2)


# --- float ---------------------------------------------------------------------------------------------------------
def test_float_tiff_range(tmp_path: Path) -> None:
    arr = np.array([[0.0, 0.25, 0.5, 1.0]] * 4, dtype=np.float32)
    good = tmp_path / "f.tif"
    Image.fromarray(arr).save(good)
    with Image.open(good) as img:
        assert img.mode == "F"
    np.testing.assert_allclose(load_image(str(good))[0][0, :, 0], arr[0])
    nearly = tmp_path / "nearly.tif"
    Image.fromarray(np.array([[-0.0005, 1.0005]], dtype=np.float32)).save(nearly)
    np.testing.assert_allclose(load_image(str(nearly))[0][0, :, 0], [0.0, 1.0])  # rounding noise: clipped
    scaled = tmp_path / "scaled255.tif"
    Image.fromarray(arr * 255).save(scaled)
    with pytest.raises(AdxDataError, match=r"scaled255\.tif.*\[0, 255\].*\[0, 1\]"):
        load_image(str(scaled))
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)).save(nan)
    with pytest.raises(AdxDataError, match=r"nan\.tif.*NaN"):
        load_image(str(nan), (4, 4))


# --- EXIF orientation ----------------------------------------------------------------------------------------------
_INVERSE = {  # stored = upright.transpose(_INVERSE[orientation]) so that exif_transpose(stored) == upright
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _upright(h: int = 60, w: int = 40) -> np.ndarray:
    """An asymmetric RGB picture: a bright block at the top-left, a mid-grey bar at the bottom."""
    arr = np.full((h, w, 3), 30, dtype=np.uint8)
    arr[: h // 3, : w // 2] = 230
    arr[-h // 6 :, :] = 120
    return arr


def _save_oriented(path: Path, upright: np.ndarray, orientation: int, **options: object) -> Path:
    img = Image.fromarray(upright)
    if _INVERSE[orientation] is not None:
        img = img.transpose(_INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, **options)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_matches_exif_transpose(tmp_path: Path, orientation: int) -> None:
    up = _upright()
    path = _save_oriented(tmp_path / f"o{orientation}.png", up, orientation)
    image, orig = load_image(str(path))
    assert orig == (60, 40)
    np.testing.assert_array_equal(np.rint(image * 255).astype(np.uint8), up)
    with Image.open(path) as img:
        reference = np.asarray(ImageOps.exif_transpose(img))
    np.testing.assert_array_equal(reference, up)  # the rule is PIL's exif_transpose
    Image.fromarray(up).save(tmp_path / "plain.png")
    resized, _ = load_image(str(path), (30, 20))
    np.testing.assert_array_equal(resized, load_image(str(tmp_path / "plain.png"), (30, 20))[0])


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_jpeg_is_upright_and_its_mask_lines_up(tmp_path: Path, orientation: int) -> None:
    up = _upright(480, 320)
    path = _save_oriented(tmp_path / "photo.jpg", up, orientation, quality=95)
    mask = np.zeros((480, 320), dtype=np.uint8)
    mask[:160, :160] = 255  # the bright block, in the upright frame
    Image.fromarray(mask).save(tmp_path / "photo_mask.png")
    sample = Sample(str(path), 1, "test", "d", str(tmp_path / "photo_mask.png"))
    check_samples([sample])  # header check compares upright sizes
    item = AnomalyDataset([sample], (48, 32))[0]
    assert item["orig_size"].tolist() == [480, 320]
    image = item["image"][0]
    assert image[1:15, 1:15].min() > 0.8 and image[18:38].max() < 0.2  # block top-left, dark middle
    assert torch.equal(item["mask"][0] > 0, torch.from_numpy(mask[5::10, 5::10] > 0))  # nearest-exact, 10x
    reference = _resize_array(up.astype(np.float32) / 255, (48, 32))
    assert np.abs(item["image"].permute(1, 2, 0).numpy() - reference).max() < 3 * GREY  # JPEG q95 noise
    raw_frame = tmp_path / "raw_mask.png"  # a mask drawn on the stored (sideways) pixels does not fit
    Image.fromarray(mask.T.copy()).save(raw_frame)
    if orientation in (6, 8):
        with pytest.raises(AdxDataError, match=r"raw_mask\.png.*320x480"):
            check_samples([Sample(str(path), 1, "test", "d", str(raw_frame))])


def test_exif_oriented_mask_is_turned_upright_too(tmp_path: Path) -> None:
    mask = np.zeros((60, 40), dtype=np.uint8)
    mask[:20, :20] = 255
    path = _save_oriented(tmp_path / "m.png", np.repeat(mask[..., None], 3, axis=2), 6)
    np.testing.assert_array_equal(load_mask(str(path)), mask > 0)


# --- palette, channels ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transparency", [False, True])
def test_palette_png_uses_palette_colours(tmp_path: Path, transparency: bool) -> None:
    indices = np.zeros((6, 8), dtype=np.uint8)
    indices[:, 4:] = 1
    img = Image.new("P", (8, 6))
    img.putdata(indices.ravel().tolist())
    img.putpalette([200, 30, 10, 0, 90, 250] + [0] * 762)
    path = tmp_path / "pal.png"
    img.save(path, **({"transparency": 0} if transparency else {}))
    with Image.open(path) as check:
        assert check.mode == "P"
    image, _ = load_image(str(path))
    np.testing.assert_allclose(image[0, 0], np.array([200, 30, 10]) / 255, atol=1e-6)
    np.testing.assert_allclose(image[0, 7], np.array([0, 90, 250]) / 255, atol=1e-6)


# --- masks -----------------------------------------------------------------------------------------------------------
def test_label_masks_any_non_zero_is_defect(tmp_path: Path) -> None:
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[0, :3] = [1, 2, 3]
    labels[5, 5] = 1
    Image.fromarray(labels).save(tmp_path / "labels.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "labels.png")), labels > 0)
    _save16(tmp_path / "labels16.png", labels.astype(np.uint16))
    np.testing.assert_array_equal(load_mask(str(tmp_path / "labels16.png")), labels > 0)
    pal = Image.new("P", (8, 8))
    pal.putdata(labels.ravel().tolist())
    pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 1, 1, 1] + [0] * 756)  # VOC-like colours per label
    pal.save(tmp_path / "voc.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "voc.png")), labels > 0)
    colour = np.zeros((8, 8, 3), dtype=np.uint8)
    colour[labels > 0] = [0, 0, 1]  # a dark blue label is still a defect
    Image.fromarray(colour).save(tmp_path / "colour.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "colour.png")), labels > 0)
    sample_img = tmp_path / "img.png"
    Image.new("L", (8, 8), 90).save(sample_img)
    item = AnomalyDataset([Sample(str(sample_img), 1, "test", "d", str(tmp_path / "labels.png"))], 8)[0]
    assert item["mask"].sum() == 4  # the 1, 2, 3 in row 0 and the 1 at (5, 5)


def test_jpeg_masks_are_thresholded_at_half_range(tmp_path: Path) -> None:
    yy, xx = np.mgrid[:64, :64]
    mask = np.where((yy - 30) ** 2 + (xx - 35) ** 2 < 15**2, 255, 0).astype(
        np.uint8
    )  # a disc: edges across blocks
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=75)
    with Image.open(tmp_path / "m.jpg") as img:
        noisy = np.asarray(img)
    assert ((noisy > 0) & (mask == 0)).any()  # compression noise that a non-zero rule would count as defect
    loaded = load_mask(str(tmp_path / "m.jpg"))
    assert (loaded != (mask > 0)).mean() < 0.01
    Image.fromarray((mask > 0).astype(np.uint8)).save(tmp_path / "labels.jpg", quality=95)
    with pytest.warns(AdxDataWarning, match=r"labels\.jpg.*PNG"):
        assert not load_mask(str(tmp_path / "labels.jpg")).any()


# --- one resize path -------------------------------------------------------------------------------------------------
def _mixed_files(folder: Path) -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    files = {
        "big.jpg": Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)),
        "small_gray.png": Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8)),
        "wide_gray.png": Image.fromarray(rng.integers(0, 255, (90, 400), dtype=np.uint8)),  # >= 2x the target
        "deep.tif": Image.fromarray(rng.integers(5000, 65535, (40, 30)).astype(np.uint16)),
        "float.tif": Image.fromarray(rng.random((33, 47), dtype=np.float32)),
        "palette.png": Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)).convert("P"),
    }
    for name, img in files.items():
        img.save(folder / name)
    return files


def _spy_resize(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], torch.dtype]]:
    calls: list[tuple[tuple[int, ...], torch.dtype]] = []
    original = ds.resize_pixels

    def spy(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        calls.append((tuple(pixels.shape), pixels.dtype))
        return original(pixels, size)

    monkeypatch.setattr(ds, "resize_pixels", spy)
    return calls


def test_every_image_goes_through_one_resize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _mixed_files(tmp_path)
    calls = _spy_resize(monkeypatch)
    samples = [Sample(str(tmp_path / name), 0, "train") for name in files]
    items = [AnomalyDataset(samples, (24, 32))[i] for i in range(len(files))]
    assert all(it["image"].shape == (3, 24, 32) and it["image"].dtype == torch.float32 for it in items)
    assert [
        shape for shape, _ in calls
    ] == [  # every file at its full decoded size, whatever its size or mode
        (3, 480, 640),
        (1, 50, 70),
        (1, 90, 400),
        (1, 40, 30),
        (1, 33, 47),
        (3, 60, 60),
    ]
    assert [dtype for _, dtype in calls] == [torch.uint8] * 3 + [torch.float32] * 2 + [torch.uint8]
    for name, item in zip(files, items, strict=True):
        with Image.open(tmp_path / name) as img:
            reference = _resize_array(_to_rgb_array(img), (24, 32))  # float decode + float resize
        diff = np.abs(item["image"].permute(1, 2, 0).numpy() - reference).max()
        eight_bit = name.endswith((".jpg", ".png"))
        assert diff <= (1.01 * GREY if eight_bit else 1e-5), (name, diff * 255)  # uint8 kernel: <= 1 level


def test_uint8_kernel_fallback_is_the_same_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 90, 120), dtype=np.uint8))
    fast = ds.resize_pixels(pixels, (30, 40))
    interpolate = ds.F.interpolate

    def float_only(x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if x.dtype == torch.uint8:
            raise RuntimeError("\"upsample_bilinear2d_aa\" not implemented for 'Byte'")
        return interpolate(x, **kwargs)

    monkeypatch.setattr(ds.F, "interpolate", float_only)
    slow = ds.resize_pixels(pixels, (30, 40))
    assert slow.dtype == torch.uint8 and (slow.int() - fast.int()).abs().max() <= 1


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_large_jpeg_within_one_grey_level_of_float_reference(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:600, :800]
    disc = np.where((yy - 300) ** 2 + (xx - 380) ** 2 < 230**2, 220.0, 15.0)  # a part on a dark background
    pixels = (disc[..., None] + rng.normal(0, 4, (600, 800, 3))).clip(0, 255).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(pixels).convert(mode).save(path, quality=92)
    with Image.open(path) as img:
        reference = _resize_array(_to_rgb_array(img), (96, 128))
    image, orig = load_image(str(path), (96, 128))
    assert orig == (600, 800) and np.abs(image - reference).max() <= 1.01 * GREY
    fast, orig = load_image(str(path), (96, 128), fast_jpeg=True)  # opt-in reduced DCT decode
    assert orig == (600, 800) and np.abs(fast - reference).mean() < 0.5 * GREY


def test_fast_jpeg_decodes_reduced_then_same_resize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _mixed_files(tmp_path)
    calls = _spy_resize(monkeypatch)
    samples = [Sample(str(tmp_path / name), 0, "train") for name in files]
    dataset = AnomalyDataset(samples, (24, 32), fast_jpeg=True)
    item = dataset[0]
    assert calls[0][0] == (3, 60, 80)  # 1/8 DCT scale: the smallest >= 2x (24, 32)
    assert item["orig_size"].tolist() == [480, 640]
    assert dataset[1]["image"].shape == (3, 24, 32) and calls[1][0] == (1, 50, 70)  # other formats: unchanged
    path = _save_oriented(tmp_path / "turned.jpg", _upright(480, 320), 6)
    image, orig = load_image(str(path), (48, 32), fast_jpeg=True)
    assert orig == (480, 320) and calls[-1][0] == (3, 120, 80)  # the draft size request follows the rotation
    assert image[1:15, 1:15].min() > 0.8


def test_decode_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "cut16.png"
    _save16(path, np.random.default_rng(0).integers(0, 65535, (64, 64)))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(AdxDataError, match=r"cut16\.png.*Replace or delete"):
        load_image(str(path), (8, 8))
    fake = tmp_path / "fake.tif"
    fake.write_bytes(b"this is no TIFF")
    with pytest.raises(AdxDataError, match=r"fake\.tif.*Replace"):
        load_mask(str(fake))
