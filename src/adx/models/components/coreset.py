"""Greedy k-center coreset subsampling (PatchCore memory-bank reduction).

Two implementations of the same selection rule are provided:

* :func:`greedy_coreset_reference` -- the textbook algorithm: at every step the distance from the newest
  centre to all ``N`` points is computed, the running minimum is updated and the point with the largest
  minimum distance becomes the next centre. ``O(n * N * d)``.
* :func:`greedy_coreset` -- identical selection, much faster. Every point remembers the centre it is
  closest to; every centre (cluster) remembers its radius (largest point-to-centre distance) and the point
  attaining it. The next centre is the far point of the widest cluster (an argmax over the ``k`` clusters,
  not over the ``N`` points). When a centre ``c`` is added, only the points of clusters ``j`` with
  ``dist(c_j, c) < 2 * radius_j`` can get closer to ``c`` than to ``c_j`` (triangle inequality), so only
  those points are visited.

Both compute point-to-centre distances with the same row-wise arithmetic (:func:`_sq_dists`) on the same
projected matrix, so the running minimum distances are bit-identical and so is the selection, including
tie-breaking (the smallest point index wins among equally far points, as ``torch.argmax`` does).
Squared Euclidean distances are used throughout; the order is the same as for Euclidean distances.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor
from tqdm import tqdm

__all__ = ["greedy_coreset", "greedy_coreset_reference", "sample_size"]

# Rows per chunk for distance computations: a chunk of 4096 x 128 float32 (2 MiB) stays in L2 cache.
_CHUNK_ROWS = 4096
# Relative safety margin on squared distances for the pruning test. Computed squared distances carry a
# relative rounding error of about log2(d) * 2**-24 (< 1e-6); 1e-3 keeps pruning provably safe.
_PRUNE_MARGIN = 1e-3
# Progress bar refresh period, in selection steps.
_PROGRESS_EVERY = 256


def sample_size(n_total: int, ratio: float) -> int:
    """Number of coreset points for ``n_total`` features at sampling ``ratio`` in (0, 1]: max(1, floor)."""
    if not (isinstance(ratio, int | float) and 0.0 < float(ratio) <= 1.0):
        raise ValueError(f"coreset sampling ratio must be in (0, 1], got {ratio!r}")
    if n_total < 0:
        raise ValueError(f"n_total must be >= 0, got {n_total}")
    return max(1, int(n_total * float(ratio)))


def _prepare(features: Tensor, projection_dim: int | None, seed: int) -> tuple[Tensor, int]:
    """Projected float32 matrix [N, p] (p = projection_dim or D) and the seeded start index."""
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D [N, D] tensor, got shape {tuple(features.shape)}")
    n_points, dim = features.shape
    if n_points == 0:
        raise ValueError("features is empty (N = 0)")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if projection_dim is not None and projection_dim <= 0:
        raise ValueError(f"projection_dim must be positive or None, got {projection_dim}")
    if projection_dim is None or projection_dim >= dim:
        projected = features.to(dtype=torch.float32).contiguous()
    else:
        # Dense Gaussian Johnson-Lindenstrauss projection, N(0, 1/p) entries; used for selection only.
        weight = torch.randn(dim, projection_dim, generator=generator, dtype=torch.float32)
        weight = weight.div_(math.sqrt(projection_dim)).to(features.device)
        projected = torch.empty(n_points, projection_dim, dtype=torch.float32, device=features.device)
        step = max(1, (1 << 24) // dim)  # bounded temporaries when features are not float32
        for start in range(0, n_points, step):
            stop = min(n_points, start + step)
            torch.matmul(features[start:stop].to(torch.float32), weight, out=projected[start:stop])
    start_index = int(torch.randint(n_points, (1,), generator=generator).item())
    return projected, start_index


def _sq_dists(points: Tensor, centre: Tensor, rows: Tensor | None, out: Tensor, scratch: Tensor) -> Tensor:
    """Squared distances [m] from ``centre`` [p] to ``points[rows]`` (or all of ``points`` [N, p]) into out.

    The arithmetic is row-wise (subtract, square, sum over a contiguous row), so a point's value does not
    depend on which other rows are computed with it. ``scratch`` is a [_CHUNK_ROWS, p] float32 buffer.
    """
    total = points.shape[0] if rows is None else rows.shape[0]
    for start in range(0, total, _CHUNK_ROWS):
        stop = min(total, start + _CHUNK_ROWS)
        block = scratch[: stop - start]
        if rows is None:
            torch.sub(points[start:stop], centre, out=block)
        else:
            torch.index_select(points, 0, rows[start:stop], out=block)
            block.sub_(centre)
        block.mul_(block)
        torch.sum(block, dim=1, out=out[start:stop])
    return out


def _check_n(n: int, n_points: int) -> bool:
    """Validate ``n``; True when every point is selected (n >= N)."""
    if n <= 0:
        raise ValueError(f"coreset size n must be positive, got {n}")
    return n >= n_points


def greedy_coreset_reference(
    features: Tensor, n: int, projection_dim: int | None = 128, seed: int = 0
) -> Tensor:
    """Plain greedy k-center selection of ``n`` rows of ``features`` [N, D] -> LongTensor [n] (ground truth)."""
    n_points = features.shape[0] if features.ndim == 2 else 0
    if features.ndim == 2 and n_points > 0 and _check_n(n, n_points):
        return torch.arange(n_points, device=features.device)
    points, index = _prepare(features, projection_dim, seed)
    device = points.device
    scratch = torch.empty(_CHUNK_ROWS, points.shape[1], device=device)
    min_dist = torch.full((n_points,), math.inf, device=device)
    dist = torch.empty(n_points, device=device)
    selected = torch.empty(n, dtype=torch.long, device=device)
    for step in range(n):
        selected[step] = index
        if step == n - 1:
            break
        _sq_dists(points, points[index], None, dist, scratch)
        torch.minimum(min_dist, dist, out=min_dist)
        index = int(torch.argmax(min_dist).item())  # first maximal index on ties
    return selected


class _ClusterState:
    """Point-to-centre assignment, per-cluster point lists (CSR buffer) and radii for the fast greedy."""

    def __init__(self, points: Tensor, n: int) -> None:
        """Allocate state for ``points`` [N, p] and up to ``n`` clusters."""
        n_points, dim = points.shape
        device = points.device
        self.points = points
        self.n_points = n_points
        self.min_dist = torch.full((n_points,), math.inf, device=device)  # [N] squared dist to own centre
        self.assign = torch.zeros(n_points, dtype=torch.long, device=device)  # [N] cluster id
        # Cluster j's candidate members are buf[seg_start[j] : seg_start[j] + seg_len[j]]. A list may hold
        # stale entries (points that moved to a newer cluster since); they are dropped when it is visited.
        self.capacity = 2 * n_points
        self.buf = torch.empty(self.capacity, dtype=torch.long, device=device)
        self.tail = 0
        self.seg_start = torch.zeros(n, dtype=torch.long, device=device)
        self.seg_len = torch.zeros(n, dtype=torch.long, device=device)
        self.radius = torch.full((n,), -1.0, device=device)  # [n] max squared dist of members; -1 = empty
        self.far = torch.zeros(n, dtype=torch.long, device=device)  # [n] smallest index attaining radius
        self.centres = torch.empty(n, dim, device=device)  # [n, p] projected centre coordinates
        self.scratch = torch.empty(_CHUNK_ROWS, dim, device=device)
        self.centre_dist = torch.empty(n, device=device)
        self.arange = torch.arange(self.capacity + 1, device=device)

    def _append(self, members: Tensor) -> int:
        """Copy ``members`` [m] to the end of the buffer, compacting all lists first if needed; start offset."""
        size = members.shape[0]
        if self.tail + size > self.capacity:
            raise RuntimeError("internal: CSR buffer overflow")  # callers rebuild before appending
        start = self.tail
        self.buf[start : start + size] = members
        self.tail += size
        return start

    def rebuild(self, n_clusters: int) -> None:
        """Rewrite all lists exactly (no stale entries) from the assignment, clusters 0..n_clusters-1."""
        order = torch.argsort(self.assign, stable=True)
        counts = torch.bincount(self.assign, minlength=n_clusters)
        self.buf[: self.n_points] = order
        self.tail = self.n_points
        self.seg_len[:n_clusters] = counts
        self.seg_start[:n_clusters] = torch.cumsum(counts, 0) - counts

    def add_first(self, index: int) -> None:
        """Create cluster 0 centred at point ``index``: all points belong to it."""
        centre = self.points[index]
        self.centres[0] = centre
        _sq_dists(self.points, centre, None, self.min_dist, self.scratch)
        self.assign.zero_()
        self.buf[: self.n_points] = self.arange[: self.n_points]
        self.tail = self.n_points
        self.seg_start[0] = 0
        self.seg_len[0] = self.n_points
        self._set_radius(torch.zeros(1, dtype=torch.long, device=self.points.device), None, None)

    def _set_radius(self, clusters: Tensor, local: Tensor | None, members: Tensor | None) -> None:
        """Recompute radius and far point of ``clusters`` [c] from members [m] grouped by ``local`` [m] ids."""
        if members is None:  # all points, single cluster
            values = self.min_dist
            best = values.max()
            far = torch.nonzero(values == best)[0, 0]
            self.radius[clusters] = best
            self.far[clusters] = far
            return
        count = clusters.shape[0]
        values = self.min_dist[members]
        radius = torch.full((count,), -1.0, device=values.device)
        radius.scatter_reduce_(0, local, values, reduce="amax", include_self=True)
        hit = values == radius[local]
        far = torch.full((count,), self.n_points, dtype=torch.long, device=values.device)
        far.scatter_reduce_(0, local[hit], members[hit], reduce="amin", include_self=True)
        self.radius[clusters] = radius
        self.far[clusters] = far

    def next_index(self, n_clusters: int) -> int:
        """Point with the largest min-distance (smallest index on ties): far point of the widest cluster."""
        radius = self.radius[:n_clusters]
        best = radius.max()
        return int(self.far[:n_clusters][radius == best].min().item())

    def add(self, index: int, cluster: int) -> int:
        """Add point ``index`` as centre of new cluster id ``cluster``; returns the number of points visited."""
        points, device = self.points, self.points.device
        centre = points[index]
        self.centres[cluster] = centre
        # Clusters that can lose points: dist(c_j, c) < 2 * r_j  <=>  d2(c_j, c) < 4 * r2_j (plus margin).
        centre_dist = self.centre_dist[:cluster]
        _sq_dists(self.centres[:cluster], centre, None, centre_dist, self.scratch)
        touched = torch.nonzero(centre_dist < self.radius[:cluster] * (4.0 * (1.0 + _PRUNE_MARGIN)))[:, 0]
        lens = self.seg_len[touched]
        starts = self.seg_start[touched]
        total = int(lens.sum().item())
        n_touched = touched.shape[0]
        local = torch.repeat_interleave(self.arange[:n_touched], lens, output_size=total)
        offsets = torch.cumsum(lens, 0) - lens
        slots = starts[local] + (self.arange[:total] - offsets[local])
        members = self.buf[slots]
        live = self.assign[members] == touched[local]  # drop stale entries
        members = members[live]
        local = local[live]
        dist = torch.empty(members.shape[0], device=device)
        _sq_dists(points, centre, members, dist, self.scratch)
        moved = dist < self.min_dist[members]
        movers = members[moved]
        self.min_dist[movers] = dist[moved]
        self.assign[movers] = cluster
        stay = ~moved
        members = members[stay]
        local = local[stay]
        # Compact the touched lists in place (each shrinks or stays the same).
        new_lens = torch.bincount(local, minlength=n_touched)
        new_offsets = torch.cumsum(new_lens, 0) - new_lens
        slots = starts[local] + (self.arange[: members.shape[0]] - new_offsets[local])
        self.buf[slots] = members
        self.seg_len[touched] = new_lens
        self._set_radius(touched, local, members)
        # The new cluster's list.
        if self.tail + movers.shape[0] > self.capacity:
            self.rebuild(cluster + 1)
        else:
            self.seg_start[cluster] = self._append(movers)
            self.seg_len[cluster] = movers.shape[0]
        self._set_radius(
            torch.tensor([cluster], device=device),
            torch.zeros(movers.shape[0], dtype=torch.long, device=device),
            movers,
        )
        return total


def greedy_coreset(
    features: Tensor,
    n: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    progress: bool = True,
    desc: str = "coreset",
) -> Tensor:
    """Greedy k-center selection of ``n`` rows of ``features`` [N, D] -> LongTensor [n], fast and exact.

    Returns the same indices as :func:`greedy_coreset_reference` (same projection, start and arithmetic).
    """
    n_points = features.shape[0] if features.ndim == 2 else 0
    if features.ndim == 2 and n_points > 0 and _check_n(n, n_points):
        return torch.arange(n_points, device=features.device)
    points, index = _prepare(features, projection_dim, seed)
    state = _ClusterState(points, n)
    selected = torch.empty(n, dtype=torch.long)
    bar = tqdm(total=n, desc=desc, unit="pt", file=sys.stderr, disable=not progress, smoothing=0.05)
    try:
        state.add_first(index)
        selected[0] = index
        for step in range(1, n):
            index = state.next_index(step)
            selected[step] = index
            state.add(index, step)
            if step % _PROGRESS_EVERY == 0:
                bar.update(_PROGRESS_EVERY)
        bar.update(n - bar.n)
    finally:
        bar.close()
    return selected.to(features.device)
