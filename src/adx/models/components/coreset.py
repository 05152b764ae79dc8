"""Greedy k-center coreset subsampling (PatchCore memory-bank reduction, Roth et al. 2022).

Two implementations of the same selection rule:

* :func:`greedy_coreset_reference` -- the textbook algorithm: at every step the distance from the newest
  centre to all ``N`` points is computed, the running minimum distance is updated and the point with the
  largest minimum distance becomes the next centre. ``O(n * N * d)``.
* :func:`greedy_coreset` -- the same selection, much faster. It starts like the reference (the "dense"
  phase, while most points can still move) and keeps, for every point, the centre it is closest to. Then
  (the "sparse" phase) every centre j keeps the list of its points sorted by distance, so its radius
  ``r_j`` and far point are the list's first entry, and the next centre is the far point of the widest
  cluster (an argmax over the ``k`` centres, not the ``N`` points). When a centre ``c`` is added, a point
  ``x`` of cluster ``j`` can only get closer to ``c`` than to ``c_j`` if ``d(c_j, c) < 2 d(x, c_j)``
  (triangle inequality), so only a prefix of each list is visited and clusters with
  ``d(c_j, c) >= 2 r_j`` are skipped. Both tests first use lower bounds from each point's coordinates
  on the top ``m`` principal axes (``|V^T (x - y)| <= |x - y|`` for orthonormal V): one matrix-vector
  product over the ``k`` centres' m coordinates rules out most clusters (the rest get the bound from all
  ``p`` coordinates), and a candidate point whose m-coordinate bound already reaches its current distance
  cannot move, so exact distances are computed for the rest only (about 1 % of the candidates on
  PatchCore's patches). Every bound carries a rounding-error allowance, so it is certified.

Both compute point-to-centre distances with the same row-wise arithmetic (:func:`_sq_dists`) on the same
projected matrix, so the minimum distances are bit-identical and so is the selection, tie-breaking
included (the smallest point index wins among equally far points, as ``torch.argmax``). Pruning uses
safety margins far above float32 rounding, so it never skips a point that could move. Squared Euclidean
distances are used throughout (same order as Euclidean distances).
"""

from __future__ import annotations

import math
import re
import sys
import time
from typing import TextIO

import torch
from torch import Tensor
from tqdm import tqdm

__all__ = ["CoresetProjection", "greedy_coreset", "greedy_coreset_reference", "sample_size", "select_coreset"]

# Elements per chunk of distance computations: 4096 rows x 128 float32 (2 MiB) stay in L2 cache.
_CHUNK_ELEMENTS = 1 << 19
# Relative safety margin on squared distances for the pruning test. A computed squared distance has a
# relative rounding error below (d + 2) * 2**-24 (worst case; typically ~1e-7); pruning is safe while the
# margin exceeds twice that, so 1e-3 is used (more for very large d, see _prune_margin).
_PRUNE_MARGIN = 1e-3
# Sparse phase: principal axes kept for the cheap lower bounds, and rows sampled to find them.
_LOW_DIM = 32
_LOW_SAMPLE = 65536
# Dense phase: check every this many steps whether the sparse phase would visit < this fraction of points.
_DENSE_CHECK_EVERY = 16
_DENSE_FRACTION = 0.25
# Progress bar refresh: at most every this many seconds, checked every _PROGRESS_EVERY steps.
_PROGRESS_EVERY = 16
_PROGRESS_SECONDS = 0.5
_LOG_SECONDS = 30.0  # refresh when stderr is a log file rather than a terminal
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} points [{elapsed} elapsed, ETA {remaining}, {rate_fmt}]"
_LOG_FORMAT = (
    "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} points, {elapsed} elapsed, ETA {remaining}, {rate_fmt}"
)
_PROBE_SECONDS = 0.5  # thread governor: length of each timed window
_RUN_SECONDS = 15.0  # thread governor: time on the chosen thread count before probing again


def sample_size(n_total: int, ratio: float) -> int:
    """Number of coreset points for ``n_total`` features at sampling ``ratio`` in (0, 1]: max(1, floor)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"coreset sampling ratio must be in (0, 1], got {ratio!r}")
    if n_total < 0:
        raise ValueError(f"n_total must be >= 0, got {n_total}")
    return max(1, int(n_total * value))


class CoresetProjection:
    """The seeded random projection and start point of :func:`greedy_coreset`, applicable to rows in parts.

    ``greedy_coreset(features, n, projection_dim, seed)`` selects exactly what
    ``select_coreset(proj(features), n, proj.start_index(N))`` selects with
    ``proj = CoresetProjection(D, projection_dim, seed)``. Projecting the rows in parts (per image, on
    several processes) gives the same values when the matrix product computes each row independently of the
    other rows in the call, as MKL does for calls of 8 rows or more (tested in tests/unit/test_coreset.py).
    """

    def __init__(self, dim: int, projection_dim: int | None = 128, seed: int = 0) -> None:
        """Draw the [dim, projection_dim] Gaussian matrix (none when projection_dim is None or >= dim)."""
        if projection_dim is not None and projection_dim <= 0:
            raise ValueError(f"projection_dim must be positive or None, got {projection_dim}")
        self.dim = int(dim)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.weight: Tensor | None = None  # [dim, p] float32 on the CPU
        if projection_dim is not None and projection_dim < dim:
            # Dense Gaussian Johnson-Lindenstrauss projection, N(0, 1/p) entries; used for selection only.
            weight = torch.randn(dim, projection_dim, generator=generator, dtype=torch.float32)
            self.weight = weight.div_(math.sqrt(projection_dim))
        self.out_dim = self.dim if self.weight is None else int(projection_dim)
        self._state = generator.get_state()  # the start point is drawn after the matrix

    def __call__(self, features: Tensor) -> Tensor:
        """Rows [N, dim] -> float32 [N, out_dim] (the rows themselves, as float32, without a projection)."""
        if self.weight is None:
            return features.detach().to(dtype=torch.float32).contiguous()
        weight = self.weight.to(features.device)
        n_points = features.shape[0]
        projected = torch.empty(n_points, self.out_dim, dtype=torch.float32, device=features.device)
        step = max(1, (1 << 24) // self.dim)  # bounded temporaries when features are not float32
        for start in range(0, n_points, step):
            stop = min(n_points, start + step)
            torch.matmul(features[start:stop].detach().to(torch.float32), weight, out=projected[start:stop])
        return projected

    def start_index(self, n_points: int) -> int:
        """The seeded first centre among ``n_points`` points."""
        generator = torch.Generator(device="cpu")
        generator.set_state(self._state)
        return int(torch.randint(n_points, (1,), generator=generator).item())


def _prepare(features: Tensor, projection_dim: int | None, seed: int) -> tuple[Tensor, int]:
    """Projected float32 matrix [N, p] (p = projection_dim or D) and the seeded start index."""
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D [N, D] tensor, got shape {tuple(features.shape)}")
    n_points, dim = features.shape
    if n_points == 0:
        raise ValueError("features is empty (N = 0)")
    projection = CoresetProjection(dim, projection_dim, seed)
    return projection(features), projection.start_index(n_points)


def _sq_dists(points: Tensor, centre: Tensor, rows: Tensor | None, out: Tensor, scratch: Tensor) -> Tensor:
    """Squared distances [m] from ``centre`` [p] to ``points[rows]`` (or all of ``points`` [N, p]) into out.

    The arithmetic is row-wise (subtract, square, sum over a contiguous row), so a point's value does not
    depend on which other rows are computed with it. ``scratch`` is a [chunk, p] float32 buffer.
    """
    total = points.shape[0] if rows is None else rows.shape[0]
    chunk = scratch.shape[0]
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        block = scratch[: stop - start]
        if rows is None:
            torch.sub(points[start:stop], centre, out=block)
        else:
            torch.index_select(points, 0, rows[start:stop], out=block)
            block.sub_(centre)
        block.mul_(block)
        torch.sum(block, dim=1, out=out[start:stop])
    return out


def _prune_margin(dim: int) -> float:
    """Relative margin on squared distances for pruning tests in dimension ``dim``."""
    return max(_PRUNE_MARGIN, 64.0 * (dim + 2) * 2.0**-24)


def _scratch(points: Tensor) -> Tensor:
    """Float32 work buffer [rows, p] for :func:`_sq_dists` (about _CHUNK_ELEMENTS elements)."""
    rows = max(64, _CHUNK_ELEMENTS // points.shape[1])
    return torch.empty(rows, points.shape[1], dtype=torch.float32, device=points.device)


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
    scratch = _scratch(points)
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


class _Clusters:
    """Per-centre member lists, radii and far points for the sparse phase of :func:`greedy_coreset`.

    Cluster j's members are ``buf_idx[seg_start[j] : seg_start[j] + seg_len[j]]``, with their squared
    min-distances in ``buf_key``, sorted by (distance descending, index ascending). A point only leaves a
    list when it moves to a new centre, which happens only while that list is being visited, so the lists
    are always exact and a list's first entry is the cluster's far point. A staying point's distance never
    changes, so the order survives. New lists are appended at ``tail``; the buffer is compacted when full.
    """

    def __init__(
        self,
        points: Tensor,
        min_dist: Tensor,
        assign: Tensor,
        centres: Tensor,
        selected: Tensor,
        n_clusters: int,
    ) -> None:
        """Build sorted lists for clusters 0..n_clusters-1 from ``assign`` [N] and ``min_dist`` [N].

        ``selected`` [>= n_clusters] holds the point index of each centre so far.
        """
        n_points = points.shape[0]
        device = points.device
        n_max = centres.shape[0]
        self.points, self.min_dist, self.assign, self.centres = points, min_dist, assign, centres
        self.n_points = n_points
        self.capacity = 2 * n_points
        # One spare slot so that clamped gathers at a list's end stay in bounds.
        self.buf_idx = torch.zeros(self.capacity + 1, dtype=torch.long, device=device)
        self.buf_key = torch.zeros(self.capacity + 1, device=device)
        self.buf_key[self.capacity] = -math.inf  # never a candidate
        self.seg_start = torch.zeros(n_max, dtype=torch.long, device=device)
        self.seg_len = torch.zeros(n_max, dtype=torch.long, device=device)
        self.radius = torch.full((n_max,), -1.0, device=device)  # [n] max squared dist of members; -1 empty
        self.far = torch.full((n_max,), n_points, dtype=torch.long, device=device)  # first entry of the list
        # Centre-centre distances use a gemv on mean-centred centres; they only feed the pruning test, so
        # an explicit rounding-error allowance turns them into lower bounds.
        self.mean = points.mean(0)
        self.centred = torch.empty(n_max, points.shape[1], device=device)  # [n, p] centres minus mean
        self.centred_sq = torch.empty(n_max, device=device)  # [n] squared norms of centred centres
        torch.sub(centres[:n_clusters], self.mean, out=self.centred[:n_clusters])
        torch.sum(self.centred[:n_clusters].square(), 1, out=self.centred_sq[:n_clusters])
        self.tolerance = 1e-4 + 4.0 * (points.shape[1] + 8) * 2.0**-24
        self._init_low(selected, n_clusters)
        self.margin = _prune_margin(points.shape[1])
        self.centre_dist = torch.empty(n_max, device=device)
        self.scratch = _scratch(points)
        self.arange = torch.arange(max(n_points, n_max) + 1, device=device)
        self.tail = 0
        self.rebuild(n_clusters)

    def _init_low(self, selected: Tensor, n_clusters: int) -> None:
        """Coordinates of every point on the top principal axes, for cheap certified lower bounds.

        ``low`` [N, m] holds ``(x - mean) @ V`` with V [p, m] orthonormal (principal axes of a row sample), so
        ``|low_x - low_y| <= d(x, y)`` up to rounding; ``low_err`` bounds any row's rounding error (a
        worst-case dot-product bound: the largest ``|x - mean|`` times a constant). Screening
        candidates on these m floats instead of the p of a row skips most exact distances: on PatchCore's
        screw patches (p = 128, m = 32) about 99 % of the candidates that pass the cluster test do not move.
        """
        points = self.points
        n_points, dim = points.shape
        m = min(_LOW_DIM, dim)
        sample = points[:: max(1, n_points // _LOW_SAMPLE)].double()
        sample = sample - sample.mean(0)
        _, vectors = torch.linalg.eigh(sample.T @ sample)  # ascending eigenvalues
        axes = vectors[:, -m:].to(torch.float32).contiguous()  # [p, m]
        self.low = torch.empty(n_points, m, device=points.device)
        largest = 0.0
        step = max(1, _CHUNK_ELEMENTS // dim)
        for start in range(0, n_points, step):
            block = points[start : start + step] - self.mean
            torch.matmul(block, axes, out=self.low[start : start + step])
            largest = max(largest, float(torch.linalg.vector_norm(block, dim=1).max()))
        # all m coordinates of a row together: sqrt(m) length-p dot products of a rounded difference; 4x the
        # textbook bound, and 1 % for the norm's own rounding and the float32 axes' orthonormality
        self.low_err = 1.01 * 4.0 * math.sqrt(m) * (dim + 2) * 2.0**-24 * largest
        self.low_tolerance = 1e-4 + 4.0 * (m + 8) * 2.0**-24
        self.low_centres = torch.empty(self.centres.shape[0], m, device=points.device)
        self.low_sq = torch.empty(self.centres.shape[0], device=points.device)
        self.low_centres[:n_clusters] = self.low.index_select(0, selected[:n_clusters].to(points.device))
        torch.sum(self.low_centres[:n_clusters].square(), 1, out=self.low_sq[:n_clusters])

    def rebuild(self, n_clusters: int) -> None:
        """Rewrite all lists contiguously from ``assign`` and ``min_dist``, sorted within each list."""
        by_dist = torch.argsort(self.min_dist, descending=True, stable=True)  # ties: ascending index
        order = by_dist[torch.argsort(self.assign[by_dist], stable=True)]
        counts = torch.bincount(self.assign, minlength=n_clusters)
        self.buf_idx[: self.n_points] = order
        self.buf_key[: self.n_points] = self.min_dist[order]
        self.tail = self.n_points
        self.seg_len[:n_clusters] = counts
        self.seg_start[:n_clusters] = torch.cumsum(counts, 0) - counts
        self._refresh(torch.arange(n_clusters, device=order.device))

    def _refresh(self, clusters: Tensor) -> None:
        """Radius and far point of ``clusters`` [c] from the first entry of their lists."""
        first = self.seg_start.index_select(0, clusters)
        empty = self.seg_len.index_select(0, clusters) == 0
        self.radius.index_copy_(0, clusters, self.buf_key.index_select(0, first).masked_fill_(empty, -1.0))
        self.far.index_copy_(
            0, clusters, self.buf_idx.index_select(0, first).masked_fill_(empty, self.n_points)
        )

    def next_index(self, n_clusters: int) -> int:
        """Point with the largest min-distance (smallest index on ties): far point of the widest cluster."""
        radius = self.radius[:n_clusters]
        widest = torch.nonzero(radius == radius.max())[:, 0]
        return int(self.far.index_select(0, widest).min().item())

    def _prefix_lengths(self, starts: Tensor, lens: Tensor, threshold: Tensor) -> Tensor:
        """Per list [c]: how many leading keys exceed ``threshold`` [c] (galloping scan of sorted lists)."""
        count = torch.zeros_like(lens)
        rows = self.arange[: lens.shape[0]]
        offset, width = 0, 16
        while True:
            cols = self.arange[:width]
            remaining = (lens - offset).unsqueeze_(1)  # [r, 1]
            pos = (starts + offset).unsqueeze_(1) + cols  # [r, width]
            pos = torch.where(cols < remaining, pos, self.capacity)  # past a list's end: the -inf slot
            keys = self.buf_key.index_select(0, pos.view(-1)).view(pos.shape)
            found = (keys > threshold.unsqueeze(1)).sum(1)
            count.index_add_(0, rows, found)
            more = torch.nonzero((found == width) & (remaining[:, 0] > width))[:, 0]
            if more.shape[0] == 0:
                return count
            rows, starts, lens = (
                rows.index_select(0, more),
                starts.index_select(0, more),
                lens.index_select(0, more),
            )
            threshold = threshold.index_select(0, more)
            offset += width
            width *= 2

    def add(self, index: int, cluster: int) -> int:
        """Add point ``index`` as the centre of new cluster id ``cluster``; returns #exact distances computed."""
        points, device = self.points, self.points.device
        centre = self.centres[cluster]
        centred = self.centred[cluster]
        torch.sub(centre, self.mean, out=centred)
        centred_sq = torch.dot(centred, centred)
        self.centred_sq[cluster] = centred_sq
        low = self.low[index]
        self.low_centres[cluster] = low
        low_sq = torch.dot(low, low)
        self.low_sq[cluster] = low_sq
        # Point x of cluster j can only get closer to c than to c_j if d(c_j, c) < 2 d(x, c_j), i.e.
        # d2(x, c_j) > d2(c_j, c) / 4 (triangle inequality); a relative margin covers rounding. Lists are
        # sorted by d2(x, c_j), so the candidates of a list are a prefix of it. First a lower bound on
        # d(c_j, c) for every centre from the m principal coordinates (|a|^2 + |b|^2 - 2 a.b minus its error
        # bound, minus both rows' coordinate errors) rules out most clusters; the clusters left get the bound
        # from all p coordinates.
        norms = self.low_sq[:cluster] + low_sq
        bound = torch.addmv(
            norms, self.low_centres[:cluster], low, alpha=-2.0, out=self.centre_dist[:cluster]
        )
        bound.sub_(norms, alpha=self.low_tolerance).clamp_(min=0.0).sqrt_().mul_(1.0 - 1e-5)
        bound.sub_(2.0 * self.low_err).clamp_(min=0.0).square_()
        bound.mul_(0.25 / (1.0 + self.margin))
        maybe = torch.nonzero(self.radius[:cluster] > bound)[:, 0]
        norms = self.centred_sq.index_select(0, maybe).add_(centred_sq)
        threshold = torch.addmv(norms, self.centred.index_select(0, maybe), centred, alpha=-2.0)
        threshold.sub_(norms, alpha=self.tolerance).mul_(0.25 / (1.0 + self.margin))
        keep = torch.nonzero(self.radius.index_select(0, maybe) > threshold)[:, 0]
        touched = maybe.index_select(0, keep)
        threshold = threshold.index_select(0, keep)
        n_touched = touched.shape[0]
        starts = self.seg_start.index_select(0, touched)
        prefix = self._prefix_lengths(starts, self.seg_len.index_select(0, touched), threshold)
        total = int(prefix.sum().item())
        local = torch.repeat_interleave(self.arange[:n_touched], prefix, output_size=total)
        first = torch.cumsum(prefix, 0).sub_(prefix)  # [T] where each list's candidates begin
        slots = (starts - first).index_select(0, local).add_(self.arange[:total])
        ids = self.buf_idx.index_select(0, slots)
        keys = self.buf_key.index_select(0, slots)
        # Candidates whose lower bound from the m principal coordinates already reaches their current
        # distance cannot move (about 99 % of them): exact distances only for the rest.
        bound = torch.linalg.vector_norm(self.low.index_select(0, ids).sub_(low), dim=1).mul_(1.0 - 1e-5)
        bound.sub_(2.0 * self.low_err).clamp_(min=0.0).square_()
        exact_at = torch.nonzero(bound < keys * (1.0 + self.margin))[:, 0]
        n_exact = exact_at.shape[0]
        exact = _sq_dists(
            points, centre, ids.index_select(0, exact_at), torch.empty(n_exact, device=device), self.scratch
        )
        dist = torch.full((total,), math.inf, device=device).index_copy_(0, exact_at, exact)
        closer = dist < keys
        moved_at = torch.nonzero(closer)[:, 0]
        movers = ids.index_select(0, moved_at)
        mover_dist = dist.index_select(0, moved_at)
        n_movers = movers.shape[0]
        self.min_dist.index_copy_(0, movers, mover_dist)
        self.assign.index_fill_(0, movers, cluster)
        # Remove movers from their lists: the staying candidates shift right by the number of movers of
        # their list (order kept), and the list now starts that many slots later.
        moved = torch.bincount(local.index_select(0, moved_at), minlength=n_touched)
        stay_at = torch.nonzero(closer.logical_not_())[:, 0]
        stays = prefix - moved
        shift = starts + moved - torch.cumsum(stays, 0).sub_(stays)
        new_slots = shift.index_select(0, local.index_select(0, stay_at)).add_(
            self.arange[: stay_at.shape[0]]
        )
        self.buf_idx.index_copy_(0, new_slots, ids.index_select(0, stay_at))
        self.buf_key.index_copy_(0, new_slots, keys.index_select(0, stay_at))
        changed = touched.index_select(0, torch.nonzero(moved)[:, 0])
        self.seg_start.index_add_(0, touched, moved)
        self.seg_len.index_add_(0, touched, moved.neg_())
        self._refresh(changed)
        # The new cluster's list, sorted by (distance descending, index ascending).
        if self.tail + n_movers > self.capacity:
            self.rebuild(cluster + 1)
        else:
            movers = movers.sort().values
            mover_dist = self.min_dist.index_select(0, movers)
            order = torch.argsort(mover_dist, descending=True, stable=True)
            end = self.tail + n_movers
            torch.index_select(movers, 0, order, out=self.buf_idx[self.tail : end])
            torch.index_select(mover_dist, 0, order, out=self.buf_key[self.tail : end])
            self.seg_start[cluster] = self.tail
            self.seg_len[cluster] = n_movers
            self.tail = end
            self._refresh(self.arange[cluster : cluster + 1])
        return n_exact


def _candidate_fraction(
    centres: Tensor, n_centres: int, index: int, points: Tensor, min_dist: Tensor, assign: Tensor
) -> float:
    """Fraction of the N points the sparse phase would visit if ``points[index]`` [p] were added now."""
    centre_dist = (centres[:n_centres] - points[index]).pow_(2).sum(1)  # [k]
    limit = min_dist * (4.0 * (1.0 + _prune_margin(points.shape[1])))  # [N]
    return (centre_dist[assign] < limit).float().mean().item()


class _ThreadGovernor:
    """Picks the faster of torch's thread count and 1 thread for the selection loop, re-checking as it goes.

    The loop's per-step work is many small ops. On an idle machine 2 threads are about 1.9x faster than
    one (152 vs 79 steps/s, 2 cores); while another process keeps a core busy, 2 threads spend their time
    waiting on each other and fall to 8 steps/s against 40 with one thread. So the loop times two adjacent
    windows (``_PROBE_SECONDS`` each, all threads then one), keeps the faster for ``_RUN_SECONDS`` and
    probes again. Per-row arithmetic does not depend on the thread count, so selections are unchanged.
    """

    def __init__(self, enabled: bool) -> None:
        """Start probing (a no-op when disabled or torch already uses one thread)."""
        self.threads = torch.get_num_threads()
        self.enabled = enabled and self.threads > 1
        self.phase, self.rates = "all", {}
        self.t0, self.step0 = time.monotonic(), 0

    def tick(self, step: int) -> None:
        """Call once per selected point with the number selected so far."""
        if not self.enabled or step % _PROGRESS_EVERY:
            return
        now = time.monotonic()
        elapsed = now - self.t0
        if self.phase == "run":
            if elapsed >= _RUN_SECONDS:
                self._start("all", self.threads, now, step)
            return
        if elapsed < _PROBE_SECONDS:
            return
        self.rates[self.phase] = (step - self.step0) / elapsed
        if self.phase == "all":
            self._start("one", 1, now, step)
        else:
            best = self.threads if self.rates["all"] >= self.rates["one"] else 1
            self._start("run", best, now, step)

    def _start(self, phase: str, threads: int, now: float, step: int) -> None:
        self.phase, self.t0, self.step0 = phase, now, step
        torch.set_num_threads(threads)

    def close(self) -> None:
        """Restore torch's thread count."""
        if self.enabled:
            torch.set_num_threads(self.threads)


class _LogLines:
    """tqdm output for a stream that is not a terminal (a log file): one plain line per refresh."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        """Drop tqdm's carriage returns, cursor moves (below another bar) and padding; write the rest as a line."""
        text = _ANSI.sub("", text).replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        """Flush the stream."""
        self.stream.flush()


class _Progress:
    """Progress bar with ETA on stderr, refreshed at most every _PROGRESS_SECONDS (cheap to call every step).

    On a terminal it is a tqdm bar; when stderr is a log file it writes one line every _LOG_SECONDS instead.
    """

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        """Open the bar (disabled when ``enabled`` is False)."""
        tty = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            desc=desc,
            file=sys.stderr if tty else _LogLines(sys.stderr),
            disable=not enabled,
            unit="pt",
            smoothing=0.1,
            miniters=1,  # print every (throttled) update; no stale refreshes from tqdm's monitor thread
            mininterval=0.0,
            bar_format=_BAR_FORMAT if tty else _LOG_FORMAT,
        )
        self.enabled = enabled
        self.every = _PROGRESS_SECONDS if tty else _LOG_SECONDS
        self.last = time.monotonic()

    def step(self, done: int) -> None:
        """Report ``done`` selected points."""
        if self.enabled and done % _PROGRESS_EVERY == 0:
            now = time.monotonic()
            if now - self.last >= self.every:
                self.bar.update(done - self.bar.n)
                self.last = now

    def close(self, done: int) -> None:
        """Final update and close."""
        self.bar.update(done - self.bar.n)
        self.bar.close()


def greedy_coreset(
    features: Tensor,
    n: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    progress: bool = True,
    desc: str = "coreset",
) -> Tensor:
    """Greedy k-center selection of ``n`` rows of ``features`` [N, D] -> LongTensor [n] (fast, exact).

    Selects the same indices as :func:`greedy_coreset_reference` with the same arguments. ``n >= N``
    returns ``arange(N)``. The random projection to ``projection_dim`` (None: none) is used for the
    selection only. On CUDA only the dense phase runs (full passes are cheap there).
    """
    n_points = features.shape[0] if features.ndim == 2 else 0
    if features.ndim == 2 and n_points > 0 and _check_n(n, n_points):
        return torch.arange(n_points, device=features.device)
    points, index = _prepare(features, projection_dim, seed)
    return select_coreset(points, n, index, progress=progress, desc=desc).to(features.device)


def select_coreset(
    points: Tensor, n: int, start_index: int, progress: bool = True, desc: str = "coreset"
) -> Tensor:
    """Greedy k-center selection of ``n`` of the (already projected) ``points`` [N, p] from ``start_index``.

    -> LongTensor [n] on the CPU (``arange(N)`` when ``n >= N``). :func:`greedy_coreset` is this on the
    output of :class:`CoresetProjection`; call it directly when the projection was computed in parts.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty 2-D [N, p] tensor, got shape {tuple(points.shape)}")
    n_points = points.shape[0]
    if _check_n(n, n_points):
        return torch.arange(n_points)
    if not 0 <= start_index < n_points:
        raise ValueError(f"start_index must be in [0, {n_points}), got {start_index}")
    points = points.detach().to(dtype=torch.float32).contiguous()
    index = start_index
    device = points.device
    selected = torch.empty(n, dtype=torch.long)
    centres = torch.empty(n, points.shape[1], device=device)  # [n, p] selected projected points
    min_dist = torch.full((n_points,), math.inf, device=device)  # [N] squared distance to nearest centre
    assign = torch.zeros(n_points, dtype=torch.long, device=device)  # [N] nearest centre (selection order)
    bar = _Progress(n, desc, progress)
    governor = _ThreadGovernor(enabled=device.type == "cpu")
    step = 0

    def accept(i: int) -> bool:
        """Record point ``i`` as the next centre; True when ``n`` are selected."""
        nonlocal step
        selected[step] = i
        centres[step] = points[i]
        step += 1
        bar.step(step)
        governor.tick(step)
        return step == n

    try:
        # Dense phase: while most points could still move, full passes (as in the reference) are cheapest.
        scratch = _scratch(points)
        dist = torch.empty(n_points, device=device)
        may_switch = device.type == "cpu"
        while not accept(index):
            _sq_dists(points, centres[step - 1], None, dist, scratch)
            assign.masked_fill_(dist < min_dist, step - 1)
            torch.minimum(min_dist, dist, out=min_dist)
            index = int(torch.argmax(min_dist).item())  # first maximal index on ties, as the reference
            if (
                may_switch
                and step % _DENSE_CHECK_EVERY == 0
                and _candidate_fraction(centres, step, index, points, min_dist, assign) < _DENSE_FRACTION
            ):
                break
        else:
            return selected
        del dist, scratch
        # Sparse phase: per-cluster sorted lists, visiting only points that can get closer to the new centre.
        clusters = _Clusters(points, min_dist, assign, centres, selected, step)
        while not accept(index):
            clusters.add(index, step - 1)
            index = clusters.next_index(step)
        return selected
    finally:
        governor.close()
        bar.close(step)
