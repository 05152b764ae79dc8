"""Tests for adx.visualize (pure NumPy image helpers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adx.visualize import (
    colormap,
    draw_contour,
    mask_edges,
    overlay,
    panel,
    save_image,
    to_uint8_image,
)


def _image(h: int = 32, w: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _square_mask(h: int = 32, w: int = 40) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[8:20, 10:25] = True
    return mask


def _on_boundary(mask: np.ndarray, y: int, x: int) -> bool:
    """True if pixel (y, x) is in the mask and a 4-neighbour is outside the mask or the image."""
    if not mask[y, x]:
        return False
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        yy, xx = y + dy, x + dx
        if not (0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1]) or not mask[yy, xx]:
            return True
    return False


def test_colormap_shape_endpoints_monotone() -> None:
    x = np.linspace(0.0, 1.0, 256)[None, :]
    rgb = colormap(x)
    assert rgb.shape == (1, 256, 3) and rgb.dtype == np.uint8
    assert not np.array_equal(rgb[0, 0], rgb[0, -1])
    assert rgb[0, 0, 2] > rgb[0, 0, 0]  # low end is blue
    assert rgb[0, -1, 0] > rgb[0, -1, 2]  # high end is red
    assert np.all(np.diff(rgb[0, :, 0].astype(int)) >= 0)  # red channel is monotone
    # Out-of-range and NaN values are clipped rather than wrapped.
    clipped = colormap(np.array([[-1.0, 2.0, np.nan]]))
    assert np.array_equal(clipped[0, 0], rgb[0, 0])
    assert np.array_equal(clipped[0, 1], rgb[0, -1])
    assert np.array_equal(clipped[0, 2], rgb[0, 0])


def test_overlay_shape_dtype_and_alpha() -> None:
    image = _image()
    heat = np.random.default_rng(1).random(image.shape[:2])
    out = overlay(image, heat, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(overlay(image, heat, alpha=0.0), image)
    assert np.array_equal(overlay(image, heat, alpha=1.0), colormap(heat))
    with pytest.raises(ValueError):
        overlay(image, heat[:-1])


def test_mask_edges_lie_on_boundary() -> None:
    mask = _square_mask()
    mask[0:3, 0:3] = True  # touches the image border
    edges = mask_edges(mask)
    assert edges.dtype == bool and edges.shape == mask.shape
    assert edges.any()
    ys, xs = np.nonzero(edges)
    assert all(_on_boundary(mask, y, x) for y, x in zip(ys, xs, strict=True))
    # ... and every boundary pixel is an edge.
    expected = np.array(
        [[_on_boundary(mask, y, x) for x in range(mask.shape[1])] for y in range(mask.shape[0])]
    )
    assert np.array_equal(edges, expected)
    # The 12x15 square has a 1-px ring: 2*12 + 2*15 - 4 pixels.
    assert edges[5:25, 5:30].sum() == 2 * 12 + 2 * 15 - 4
    assert not mask_edges(np.zeros((5, 5), dtype=bool)).any()


def test_draw_contour_paints_only_near_boundary() -> None:
    image = np.zeros((32, 40, 3), dtype=np.uint8)
    mask = _square_mask()
    out = draw_contour(image, mask, color=(0, 255, 0))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not image.any()  # input untouched
    painted = (out != 0).any(axis=2)
    assert painted.any()
    assert np.all(out[painted] == np.array([0, 255, 0], dtype=np.uint8))
    # Every painted pixel is within one pixel of the boundary; the band is 2 px thick.
    edges = mask_edges(mask)
    ys, xs = np.nonzero(painted)
    for y, x in zip(ys, xs, strict=True):
        assert edges[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].any()
    assert painted[8:20, 10:25].sum() == edges.sum()  # inner ring
    assert painted[14, 8:12].tolist() == [False, True, True, False]  # 2-px across the left side
    # Interior and far background untouched.
    assert not painted[10:18, 12:23].any()
    assert not painted[0:6].any()


def test_panel_layout() -> None:
    image = _image()
    heat = np.random.default_rng(2).random(image.shape[:2])
    gt = _square_mask()
    pred = np.zeros_like(gt)
    pred[5:15, 5:15] = True
    h, w = image.shape[:2]
    out = panel(image, heat, pred, gt, title="ignored")
    assert out.shape == (h, 3 * w + 2 * 4, 3) and out.dtype == np.uint8
    assert np.all(out[:, w : w + 4] == 255)  # white gap
    assert np.array_equal(out[:, :w], draw_contour(image, gt))
    assert np.array_equal(out[:, w + 4 : 2 * w + 4], overlay(image, heat))
    third = out[:, 2 * w + 8 :].astype(int)
    band = draw_contour(np.zeros_like(image), pred, color=(255, 0, 0))[..., 0] == 255
    assert np.all(third[band] == [255, 0, 0])  # red contour
    outside = ~pred & ~band
    assert np.array_equal(third[outside], image[outside].astype(int))  # untouched outside
    inside = pred & ~band
    assert inside.any()
    assert np.all(third[inside][:, 0] >= image[inside][:, 0])  # tinted towards red
    assert np.all(third[inside][:, 1:] <= image[inside][:, 1:])
    # Singleton channel planes (as sliced from [N,1,H,W] batches) are accepted.
    assert np.array_equal(panel(image, heat[None], pred[None], gt[..., None]), out)
    no_pred = panel(image, heat, None, None)
    assert no_pred.shape == (h, 2 * w + 4, 3)
    assert np.array_equal(no_pred[:, :w], image)


def test_save_image_roundtrip_and_no_overwrite(tmp_path: Path) -> None:
    image = _image()
    path = tmp_path / "nested" / "dir" / "panel.png"
    assert save_image(path, image) == path
    assert np.array_equal(np.asarray(Image.open(path)), image)
    with pytest.raises(FileExistsError, match="panel.png"):
        save_image(path, np.zeros_like(image))
    assert np.array_equal(np.asarray(Image.open(path)), image)  # untouched
    save_image(path, np.zeros_like(image), overwrite=True)
    assert not np.asarray(Image.open(path)).any()
    save_image(tmp_path / "mask.png", _square_mask())
    with pytest.raises(TypeError):
        save_image(tmp_path / "float.png", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="bmp"):
        save_image(tmp_path / "panel.bmp", image)


def test_save_image_jpeg(tmp_path: Path) -> None:
    ramp = np.linspace(0, 255, 40)[None, :, None] * np.linspace(0.2, 1.0, 32)[:, None, None]
    image = np.repeat(ramp, 3, axis=2).astype(np.uint8)  # smooth, as heatmap panels are
    path = save_image(tmp_path / "panel.jpg", image, quality=95)
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.size == (image.shape[1], image.shape[0])
        decoded = np.asarray(img).astype(int)
    assert np.abs(decoded - image).mean() < 8  # lossy but close
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert save_image(tmp_path / "alpha.jpeg", rgba).exists()


def test_to_uint8_image() -> None:
    t = torch.rand(3, 8, 10)
    out = to_uint8_image(t)
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    assert np.array_equal(out, (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert to_uint8_image(torch.full((3, 2, 2), 2.0)).min() == 255  # clamped
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert np.abs(to_uint8_image(normalised, mean, std).astype(int) - out.astype(int)).max() <= 1
    assert to_uint8_image(torch.rand(1, 4, 4)).shape == (4, 4, 3)
