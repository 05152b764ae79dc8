"""Anomaly-detection metrics: image/pixel AUROC, F1-max, AUPRO, thresholds and a text table.

All heavy lifting happens on CPU in NumPy with memory-light, sort-based exact algorithms:

* AUROC is the Mann-Whitney statistic ``P(s_pos > s_neg) + 0.5 * P(s_pos == s_neg)``, computed by sorting the
  positive and the negative scores separately and counting with ``np.searchsorted`` (no index arrays over all
  pixels). Above ``max_exact_pixels`` pixels, :func:`pixel_auroc` switches to a fixed-bin histogram AUROC
  (``num_bins`` equal-width bins over ``[min, max]``, ties inside a bin count one half), which is O(n), needs
  only O(num_bins) extra memory and differs from the exact value by at most the within-bin pair mass
  (typically < 1e-4 for 10k bins).
* AUPRO follows Bergmann et al., "The MVTec Anomaly Detection Dataset" (IJCV 2021): regions are the
  8-connected components of every ground-truth mask, PRO(t) is the mean over all regions of the fraction of
  the region with ``score >= t``, FPR(t) is taken over all normal pixels of all images, and the curve is
  integrated exactly (every distinct score is a vertex) from FPR 0 to ``fpr_limit`` and divided by it.

Scores may be any real-dtype tensor or array (computed in float32; float64 is kept); labels and masks are
binarised with ``> 0.5``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

__all__ = [
    "aupro",
    "compute_metrics",
    "f1_max",
    "format_table",
    "image_auroc",
    "pixel_auroc",
    "quantile_threshold",
]

ArrayLike = Tensor | np.ndarray

#: Above this many pixels :func:`pixel_auroc` uses the binned (histogram) approximation by default.
MAX_EXACT_PIXELS = 50_000_000
#: Number of equal-width bins of the histogram AUROC.
NUM_BINS = 10_000
_CHUNK = 1 << 22  # elements per chunk in chunked passes (~4M)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------- helpers
def _scores_np(x: ArrayLike) -> np.ndarray:
    """Any tensor/array -> contiguous float32 (float64 kept as is) NumPy array of the same shape."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        x = (x if x.dtype == torch.float64 else x.to(torch.float32)).numpy()
    x = np.asarray(x)
    arr = np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
    if np.isnan(arr).any():
        raise ValueError("scores contain NaN")
    return arr


def _binary_np(x: ArrayLike) -> np.ndarray:
    """Any tensor/array of labels or masks -> bool NumPy array (``x > 0.5``) of the same shape."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return (x.numpy() if x.dtype == torch.bool else (x.float() > 0.5).numpy()).astype(bool, copy=False)
    arr = np.asarray(x)
    return arr if arr.dtype == bool else arr > 0.5


def _squeeze_maps(x: np.ndarray) -> np.ndarray:
    """[N,1,H,W] -> [N,H,W]; [H,W] -> [1,H,W]; [N,H,W] unchanged."""
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim == 2:
        return x[None]
    if x.ndim != 3:
        raise ValueError(f"expected maps/masks of shape [N,H,W] (or [N,1,H,W]), got {tuple(x.shape)}")
    return x


def _split_sorted(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat scores[M], labels[M] -> (sorted positive scores[P], sorted negative scores[M-P])."""
    scores = scores.reshape(-1)
    labels = labels.reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in size: {scores.size} vs {labels.size}")
    pos = scores[labels]
    neg = scores[~labels]
    pos.sort()
    neg.sort()
    return pos, neg


def _auroc_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """Exact AUROC (ties count 1/2) from sorted positive scores[P] and sorted negative scores[Q]."""
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0 or n_neg == 0:
        return math.nan
    below = 0  # number of (pos, neg) pairs with neg < pos
    equal = 0  # number of pairs with neg == pos
    for start in range(0, n_pos, _CHUNK):
        chunk = pos[start : start + _CHUNK]
        left = np.searchsorted(neg, chunk, side="left")
        right = np.searchsorted(neg, chunk, side="right")
        below += int(left.sum(dtype=np.int64))
        equal += int((right - left).sum(dtype=np.int64))
    return (below + 0.5 * equal) / (float(n_pos) * float(n_neg))


def _auroc_exact(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact AUROC of flat scores[M] against bool labels[M]."""
    return _auroc_sorted(*_split_sorted(scores, labels))


def _auroc_binned(scores: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> float:
    """Histogram AUROC of flat scores[M] vs bool labels[M] with ``num_bins`` equal bins over [min, max]."""
    scores = scores.reshape(-1)
    labels = labels.reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in size: {scores.size} vs {labels.size}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    lo, hi = float(scores.min()), float(scores.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return _auroc_exact(scores, labels)
    hist = np.zeros(2 * num_bins, dtype=np.int64)  # [negatives | positives]
    scale = num_bins / (hi - lo) if hi > lo else 0.0
    for start in range(0, scores.size, _CHUNK):
        s = scores[start : start + _CHUNK].astype(np.float64)
        idx = np.minimum(((s - lo) * scale).astype(np.int64), num_bins - 1)
        idx += labels[start : start + _CHUNK] * num_bins
        hist += np.bincount(idx, minlength=2 * num_bins)
    neg = hist[:num_bins].astype(np.float64)
    pos = hist[num_bins:].astype(np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


# --------------------------------------------------------------------------------------------- public
def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Exact AUROC of image scores[N] vs binary labels[N] (1 = anomalous); NaN if only one class."""
    return _auroc_exact(_scores_np(scores), _binary_np(labels))


def pixel_auroc(
    maps: ArrayLike,
    masks: ArrayLike,
    *,
    max_exact_pixels: int | None = MAX_EXACT_PIXELS,
    num_bins: int = NUM_BINS,
) -> float:
    """Pixel AUROC of maps[N,H,W] vs masks[N,H,W]; exact up to ``max_exact_pixels``, else histogram-binned."""
    s = _scores_np(maps)
    y = _binary_np(masks)
    if s.size != y.size:
        raise ValueError(f"maps and masks differ in size: {tuple(s.shape)} vs {tuple(y.shape)}")
    if max_exact_pixels is not None and s.size > max_exact_pixels:
        return _auroc_binned(s, y, num_bins)
    return _auroc_exact(s, y)


def f1_max(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds of scores[M] vs labels[M] and the (smallest) threshold reaching it.

    A sample is predicted anomalous when ``score >= threshold``. Returns ``(nan, nan)`` without positives.
    Works on any shape (flattened), so it also gives pixel F1-max for maps[N,H,W] vs masks[N,H,W].
    """
    pos, neg = _split_sorted(_scores_np(scores), _binary_np(labels))
    n_pos = pos.size
    if n_pos == 0:
        return math.nan, math.nan
    # The optimum is attained at a threshold equal to some positive score: moving the threshold up to the
    # next positive score keeps TP and cannot increase FP.
    first = np.ones(n_pos, dtype=bool)
    first[1:] = pos[1:] != pos[:-1]
    thresholds = pos[first]
    tp = n_pos - np.flatnonzero(first)  # positives with score >= threshold
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    f1 = 2.0 * tp / (tp + fp + n_pos)  # == 2TP / (2TP + FP + FN)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def quantile_threshold(normal_scores: ArrayLike, q: float = 0.99) -> float:
    """The ``q``-quantile (linear interpolation, as ``numpy.quantile``) of normal scores of any shape."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    s = _scores_np(normal_scores).reshape(-1)
    if s.size == 0:
        raise ValueError("quantile_threshold needs at least one score")
    return float(np.quantile(s, q))


def _region_weights(
    scores: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """maps[N,H,W], masks[N,H,W] -> (anomalous-pixel scores[A], weights[A] = 1/(R*|region|)), or Nones."""
    region_scores: list[np.ndarray] = []
    region_ids: list[np.ndarray] = []
    n_regions = 0
    for score_map, mask in zip(scores, masks, strict=True):
        if not mask.any():
            continue
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        region_scores.append(score_map[mask])
        region_ids.append(labelled[mask].astype(np.int64) + (n_regions - 1))
        n_regions += count
    if n_regions == 0:
        return None, None
    ids = np.concatenate(region_ids)
    sizes = np.bincount(ids, minlength=n_regions).astype(np.float64)
    weights = 1.0 / (n_regions * sizes[ids])
    return np.concatenate(region_scores), weights


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve of maps[N,H,W] vs masks[N,H,W] up to ``fpr_limit``.

    Exact: every distinct score is a curve vertex; the end point is linearly interpolated at ``fpr_limit``
    and the area is divided by ``fpr_limit`` (a perfect map scores 1.0, a constant one ``fpr_limit / 2``).
    NaN if there is no anomalous region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    s = _squeeze_maps(_scores_np(maps))
    m = _squeeze_maps(_binary_np(masks))
    if s.shape != m.shape:
        raise ValueError(f"maps and masks differ in shape: {tuple(s.shape)} vs {tuple(m.shape)}")
    anom_scores, anom_weights = _region_weights(s, m)
    if anom_scores is None:
        return math.nan
    neg = s[~m]  # copy of all normal-pixel scores
    n_neg = neg.size
    if n_neg == 0:
        return math.nan

    # Only thresholds >= t_cut matter: t_cut is the k-th largest normal score, the first (highest) threshold
    # whose FPR reaches fpr_limit; pixels below it never change the curve on [0, fpr_limit].
    k = min(max(math.ceil(fpr_limit * n_neg), 1), n_neg)
    neg.partition(n_neg - k)
    t_cut = neg[n_neg - k]
    neg = neg[neg >= t_cut]  # ties with t_cut may sit left of the partition point
    keep = anom_scores >= t_cut
    values = np.concatenate([neg, anom_scores[keep]])
    weights = np.concatenate([np.zeros(neg.size), anom_weights[keep]])
    is_neg = np.concatenate([np.ones(neg.size, dtype=bool), np.zeros(int(keep.sum()), dtype=bool)])

    order = np.argsort(values, kind="stable")[::-1]  # descending score
    values = values[order]
    last = np.ones(values.size, dtype=bool)  # last element of each run of equal scores
    last[:-1] = values[:-1] != values[1:]
    fpr = np.concatenate([[0.0], np.cumsum(is_neg[order], dtype=np.int64)[last] / n_neg])
    pro = np.concatenate([[0.0], np.cumsum(weights[order])[last]])

    # Trapezoid on [0, fpr_limit]; the final vertex (threshold t_cut) has fpr >= fpr_limit.
    end = int(np.searchsorted(fpr, fpr_limit, side="left"))  # first vertex with fpr >= fpr_limit
    end = min(end, fpr.size - 1)
    x, y = fpr[: end + 1].copy(), pro[: end + 1].copy()
    if x[-1] > fpr_limit:
        x0, y0 = x[-2], y[-2]
        y[-1] = y0 + (y[-1] - y0) * (fpr_limit - x0) / (x[-1] - x0)
        x[-1] = fpr_limit
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))
    return min(area / fpr_limit, 1.0)  # guard against float round-off just above 1


def compute_metrics(
    image_scores: ArrayLike,
    labels: ArrayLike,
    maps: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    has_mask: ArrayLike | None = None,
) -> dict[str, float]:
    """Image metrics from scores[N], labels[N]; pixel metrics from maps[N,H,W], masks[N,H,W] when available.

    Keys: ``image_AUROC``, ``image_F1max`` and, if maps and masks are given and some used mask is non-empty,
    ``pixel_AUROC``, ``pixel_F1max``, ``AUPRO``. Pixel metrics use only images with ground truth: good
    images (label 0) and anomalous ones with ``has_mask[N]`` True; if ``has_mask`` is None an anomalous image
    is taken to have ground truth iff its mask is non-empty. Masks of good images are treated as empty.
    """
    y = _binary_np(labels).reshape(-1)
    out = {"image_AUROC": image_auroc(image_scores, y), "image_F1max": f1_max(image_scores, y)[0]}
    if maps is None or masks is None:
        return out
    s = _squeeze_maps(_scores_np(maps))
    m = _squeeze_maps(_binary_np(masks))
    if s.shape != m.shape:
        raise ValueError(f"maps and masks differ in shape: {tuple(s.shape)} vs {tuple(m.shape)}")
    if s.shape[0] != y.size:
        raise ValueError(f"{s.shape[0]} maps but {y.size} labels")
    if has_mask is None:
        gt = m.reshape(m.shape[0], -1).any(axis=1)
    else:
        gt = _binary_np(has_mask).reshape(-1)
        if gt.size != y.size:
            raise ValueError(f"{gt.size} has_mask entries but {y.size} labels")
    use = ~y | gt
    good = ~y
    if good.any() and m[good].any():  # a good image's mask is empty by definition
        m = m.copy()
        m[good] = False
    if not use.all():
        s, m = s[use], m[use]
    if not m.any():
        return out
    out["pixel_AUROC"] = pixel_auroc(s, m)
    out["pixel_F1max"] = f1_max(s, m)[0]
    out["AUPRO"] = aupro(s, m)
    return out


def format_table(metrics: dict[str, float]) -> str:
    """Render ``{name: value}`` as an aligned two-column text table with 4-decimal values."""
    rows = [
        (str(k), "nan" if v is None or math.isnan(float(v)) else f"{float(v):.4f}")
        for k, v in metrics.items()
    ]
    w_name = max([len("metric")] + [len(r[0]) for r in rows])
    w_val = max([len("value")] + [len(r[1]) for r in rows])
    lines = [f"{'metric':<{w_name}} | {'value':>{w_val}}", f"{'-' * w_name}-+-{'-' * w_val}"]
    lines += [f"{name:<{w_name}} | {val:>{w_val}}" for name, val in rows]
    return "\n".join(lines)
