"""Tests for adx.metrics against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchmetrics.functional.classification import binary_auroc

from adx.metrics import (
    aupro,
    compute_metrics,
    f1_max,
    format_table,
    image_auroc,
    pixel_auroc,
    quantile_threshold,
)


# ----------------------------------------------------------------------------------- slow references
def brute_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Pairwise Mann-Whitney AUROC: P(pos > neg) + 0.5 P(pos == neg)."""
    pos = scores[labels.astype(bool)]
    neg = scores[~labels.astype(bool)]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def brute_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    """Max F1 over every candidate threshold (all unique scores), predicting score >= t."""
    labels = labels.astype(bool)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = (pred & labels).sum()
        fp = (pred & ~labels).sum()
        fn = (~pred & labels).sum()
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return float(best)


def f1_at(scores: np.ndarray, labels: np.ndarray, t: float) -> float:
    """F1 when predicting ``scores >= t``."""
    labels = labels.astype(bool)
    pred = scores >= t
    tp = (pred & labels).sum()
    return float(2 * tp / (pred.sum() + labels.sum()))


def reference_aupro(maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray, limit: float = 0.3) -> float:
    """Slow AUPRO: loop over thresholds, per-region overlaps, trapezoid to ``limit``, normalised."""
    masks = masks.astype(bool)
    regions = []
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.sort(thresholds)[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([pred[i][reg].mean() for i, reg in regions])
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    fpr, pro = np.array(points).T
    order = np.argsort(fpr, kind="stable")
    fpr, pro = fpr[order], pro[order]
    j = int(np.argmax(fpr >= limit))  # first point at or beyond the limit (exists: the last is (1, 1))
    pro_end = pro[j - 1] + (pro[j] - pro[j - 1]) * (limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
    x = np.concatenate([fpr[:j], [limit]])
    y = np.concatenate([pro[:j], [pro_end]])
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / limit)


def blob_masks(n: int, size: int, seed: int) -> np.ndarray:
    """Random masks[n,size,size] with a few rectangles per image (some images empty)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue  # a good image
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 3, size=2)
            h, w = rng.integers(1, max(2, size // 3), size=2)
            masks[i, y : y + h, x : x + w] = True
    return masks


# ----------------------------------------------------------------------------------- image metrics
def test_image_auroc_perfect_inverted_random() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert image_auroc(torch.tensor([0.1, 0.2, 0.3, 0.8, 0.9]), labels) == 1.0
    assert image_auroc(torch.tensor([0.9, 0.8, 0.7, 0.2, 0.1]), labels) == 0.0
    assert image_auroc(torch.ones(5), labels) == 0.5
    rng = np.random.default_rng(0)
    auc = image_auroc(torch.from_numpy(rng.random(20000)), torch.from_numpy(rng.random(20000) > 0.5))
    assert abs(auc - 0.5) < 0.02


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_pairwise_and_torchmetrics(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 60
    # Rounded scores create ties, which must count one half.
    scores = np.round(rng.normal(size=n) + rng.random(n), 1).astype(np.float32)
    labels = rng.random(n) < 0.4
    expected = brute_auroc(scores, labels)
    assert image_auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(
        expected, abs=1e-12
    )
    tm = binary_auroc(torch.from_numpy(scores), torch.from_numpy(labels).long()).item()
    assert image_auroc(scores, labels) == pytest.approx(tm, abs=1e-5)


def test_image_auroc_single_class_is_nan() -> None:
    assert math.isnan(image_auroc(torch.rand(10), torch.zeros(10)))
    assert math.isnan(image_auroc(torch.rand(10), torch.ones(10)))


def test_nan_scores_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        image_auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------------- F1-max
@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(80), 2).astype(np.float32)
    labels = rng.random(80) < 0.3
    labels[0] = True
    f1, thr = f1_max(torch.from_numpy(scores), torch.from_numpy(labels))
    assert f1 == pytest.approx(brute_f1(scores, labels), abs=1e-12)
    assert f1_at(scores, labels, thr) == pytest.approx(f1, abs=1e-12)


def test_f1_max_perfect_and_edge_cases() -> None:
    f1, thr = f1_max(torch.tensor([0.1, 0.2, 0.7, 0.9]), torch.tensor([0, 0, 1, 1]))
    assert f1 == 1.0 and thr == pytest.approx(0.7)
    f1, thr = f1_max(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))  # all positive: predict everything
    assert f1 == 1.0 and thr == pytest.approx(0.1)
    f1, thr = f1_max(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))
    assert math.isnan(f1) and math.isnan(thr)


def test_f1_max_on_pixel_maps() -> None:
    rng = np.random.default_rng(3)
    masks = blob_masks(6, 16, seed=3)
    maps = np.round(masks * 0.3 + rng.random(masks.shape), 2).astype(np.float32)
    f1, thr = f1_max(torch.from_numpy(maps), torch.from_numpy(masks))
    assert f1 == pytest.approx(brute_f1(maps.ravel(), masks.ravel()), abs=1e-12)
    assert f1_at(maps.ravel(), masks.ravel(), thr) == pytest.approx(f1, abs=1e-12)


def test_quantile_threshold() -> None:
    x = torch.rand(1001)
    assert quantile_threshold(x, 0.99) == pytest.approx(torch.quantile(x, 0.99).item(), abs=1e-6)
    assert quantile_threshold(x, 0.0) == pytest.approx(x.min().item())
    assert quantile_threshold(x, 1.0) == pytest.approx(x.max().item())
    with pytest.raises(ValueError):
        quantile_threshold(x, 1.5)


# ----------------------------------------------------------------------------------- pixel AUROC
def test_pixel_auroc_exact_matches_pairwise() -> None:
    rng = np.random.default_rng(1)
    masks = blob_masks(4, 12, seed=1)
    maps = np.round(masks * 0.5 + rng.random(masks.shape), 2).astype(np.float32)
    expected = brute_auroc(maps.ravel(), masks.ravel())
    assert pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(torch.from_numpy(masks).float(), torch.from_numpy(masks)) == 1.0
    assert math.isnan(pixel_auroc(torch.rand(2, 4, 4), torch.zeros(2, 4, 4)))


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_binned_agrees_with_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = torch.from_numpy(blob_masks(20, 64, seed=seed))
    maps = masks.float() * rng.uniform(0.2, 1.5) + torch.from_numpy(rng.normal(size=masks.shape)).float()
    exact = pixel_auroc(maps, masks, max_exact_pixels=None)
    binned = pixel_auroc(maps, masks, max_exact_pixels=0)
    assert exact != binned  # the binned path really ran
    assert binned == pytest.approx(exact, abs=1e-3)


def test_pixel_auroc_binned_constant_map() -> None:
    masks = torch.from_numpy(blob_masks(3, 8, seed=0))
    assert pixel_auroc(torch.ones(3, 8, 8), masks, max_exact_pixels=0) == 0.5


# ----------------------------------------------------------------------------------- AUPRO
def test_aupro_perfect_is_one() -> None:
    masks = torch.from_numpy(blob_masks(6, 32, seed=0))
    assert aupro(masks.float(), masks) == pytest.approx(1.0, abs=1e-12)


def test_aupro_constant_map_is_low() -> None:
    masks = torch.from_numpy(blob_masks(6, 32, seed=0))
    value = aupro(torch.full(masks.shape, 0.5), masks)
    assert value == pytest.approx(0.15, abs=1e-12)  # PRO = FPR line: area 0.3^2/2 over 0.3
    assert aupro(-masks.float(), masks) < 0.2


def test_aupro_no_regions_is_nan() -> None:
    assert math.isnan(aupro(torch.rand(3, 8, 8), torch.zeros(3, 8, 8)))


def test_aupro_hand_checked() -> None:
    # One 2x2 image, one region = the top row; the normal pixels score 0.1 and 0.6 (fpr 0.5 at t=0.6).
    maps = torch.tensor([[[0.9, 0.5], [0.1, 0.6]]])
    masks = torch.tensor([[[1, 1], [0, 0]]])
    # Curve: (0,0) -> t=0.9 (0, .5) -> t=0.6 (.5, .5). Interpolated to fpr .3: pro .5; area .15 / .3.
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = blob_masks(6, 24, seed=seed)
    # Regions of different sizes and detectabilities, plus noise.
    maps = (masks * rng.uniform(0.3, 1.0, size=(6, 1, 1)) + 0.6 * rng.random(masks.shape)).astype(np.float32)
    fast = aupro(torch.from_numpy(maps), torch.from_numpy(masks))
    # Every distinct score as threshold: the exact curve.
    exact_ref = reference_aupro(maps, masks, np.unique(maps))
    assert fast == pytest.approx(exact_ref, abs=1e-9)
    # A few hundred evenly spaced thresholds, as common implementations do.
    coarse_ref = reference_aupro(maps, masks, np.linspace(maps.min(), maps.max(), 300))
    assert fast == pytest.approx(coarse_ref, abs=1e-2)


def test_aupro_ties_and_fpr_limit_hit_exactly() -> None:
    # Quantised scores: many ties, and fpr vertices landing exactly on 0.3 for some inputs.
    rng = np.random.default_rng(7)
    masks = blob_masks(5, 20, seed=7)
    maps = np.round(masks * 0.4 + rng.random(masks.shape), 1).astype(np.float32)
    for limit in (0.05, 0.3, 1.0):
        fast = aupro(maps, masks, fpr_limit=limit)
        assert fast == pytest.approx(reference_aupro(maps, masks, np.unique(maps), limit), abs=1e-9)


def test_aupro_eight_connectivity() -> None:
    # Two diagonal pixels form ONE region with 8-connectivity; detecting one of them gives PRO 0.5.
    masks = torch.zeros(1, 6, 6, dtype=torch.bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True
    maps = torch.zeros(1, 6, 6)
    maps[0, 1, 1] = 1.0
    # Curve: (0,0) -> (0,.5) at t=1 -> (1,1) at t=0: pro at .3 = .5 + .5*.3 = .65; area = .3*(.5+.65)/2.
    assert aupro(maps, masks) == pytest.approx((0.5 + 0.65) / 2, abs=1e-12)


def test_aupro_runs_on_100_maps_of_256() -> None:
    torch.manual_seed(0)
    masks = torch.zeros(100, 256, 256, dtype=torch.bool)
    masks[::2, 100:140, 60:120] = True
    masks[1::4, 10:30, 200:250] = True
    maps = torch.rand(100, 256, 256) + masks.float() * 0.5
    value = aupro(maps, masks)
    assert 0.0 < value <= 1.0


# ----------------------------------------------------------------------------------- compute_metrics
def test_compute_metrics_keys_and_mask_selection() -> None:
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(blob_masks(9, 16, seed=0))  # images 0, 3, 6 empty
    labels = masks.flatten(1).any(1).long()
    scores = labels.float() + 0.1 * torch.from_numpy(rng.random(9)).float()
    maps = masks.float() + 0.5 * torch.from_numpy(rng.random(masks.shape)).float()

    image_only = compute_metrics(scores, labels)
    assert set(image_only) == {"image_AUROC", "image_F1max"}
    assert image_only["image_AUROC"] == 1.0 and image_only["image_F1max"] == 1.0

    full = compute_metrics(scores, labels, maps, masks)
    assert set(full) == {"image_AUROC", "image_F1max", "pixel_AUROC", "pixel_F1max", "AUPRO"}
    assert full["pixel_AUROC"] == pytest.approx(pixel_auroc(maps, masks))
    assert full["AUPRO"] == pytest.approx(aupro(maps, masks))

    # An anomalous image without ground truth (empty mask, bad map) is excluded from the pixel metrics.
    labels2 = labels.clone()
    labels2[0] = 1
    maps2 = maps.clone()
    maps2[0] = 10.0
    inferred = compute_metrics(scores, labels2, maps2, masks)
    has_mask = masks.flatten(1).any(1)
    explicit = compute_metrics(scores, labels2, maps2, masks, has_mask=has_mask)
    for key in ("pixel_AUROC", "pixel_F1max", "AUPRO"):
        assert inferred[key] == pytest.approx(full[key])
        assert explicit[key] == pytest.approx(full[key])
    # Claiming it has (empty) ground truth includes it, which lowers the pixel AUROC.
    included = compute_metrics(scores, labels2, maps2, masks, has_mask=torch.ones(9, dtype=torch.bool))
    assert included["pixel_AUROC"] < full["pixel_AUROC"]


def test_compute_metrics_skips_pixel_metrics_without_masks() -> None:
    labels = torch.tensor([0, 1, 0, 1])
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8])
    maps = torch.rand(4, 8, 8)
    out = compute_metrics(scores, labels, maps, torch.zeros(4, 8, 8))
    assert set(out) == {"image_AUROC", "image_F1max"}
    out = compute_metrics(
        scores, labels, maps, torch.ones(4, 8, 8), has_mask=torch.zeros(4, dtype=torch.bool)
    )
    assert set(out) == {"image_AUROC", "image_F1max"}  # only good images remain, and their masks are empty


def test_format_table() -> None:
    table = format_table({"image_AUROC": 0.98765, "AUPRO": float("nan")})
    lines = table.splitlines()
    assert len(lines) == 4
    assert "0.9877" in lines[2] and "nan" in lines[3]
    assert len({line.index("|") for line in lines if "|" in line}) == 1
