"""The patch-feature pool a coreset is selected from, kept compact, and its gathering across processes.

A memory-bank method sees its training patches image by image. :class:`PatchPool` keeps of each image only
what the greedy coreset needs in memory, the float32 random projection (``projection_dim`` columns, 128 by
default), and stores the full-dimension float32 rows compactly: in memory while they are small, in an
anonymous temporary file (``$TMPDIR``, removed when closed or when the process ends) once they are large,
appended image by image with no concatenation copy. Only the selected rows are read back, at full float32
precision, so the memory bank is the one the whole pool in memory would give.

:func:`coreset_bank` puts the pool in a canonical order (images sorted by key, the image path, as the
data listers sort; duplicate keys kept once) and, inside a process group, gathers it from every rank with
:func:`adx.distributed.gather_rows`: the projected rows of every image go to every rank, each rank runs
the same (deterministic) selection, and each reads its own selected full rows, which are gathered into the
bank. N processes that each see a disjoint shard of the images (padded by repeats, as DistributedSampler
does) therefore build the same bank, row for row, as one process that sees them all.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import PurePath
from typing import IO

import numpy as np
import torch
from torch import Tensor

from adx import distributed
from adx.models.components.coreset import CoresetProjection, sample_size, select_coreset

__all__ = ["POOL_STORES", "PatchPool", "coreset_bank"]

POOL_STORES = ("auto", "memory", "disk")
# "auto": full-dimension rows stay in memory up to this many bytes, then move to a temporary file.
SPILL_BYTES = 1 << 30


class PatchPool:
    """Patch rows of the images seen so far: projected rows in memory, full rows in memory or on disk.

    Images are added with :meth:`add`; :meth:`finish` returns the projected rows of a chosen image order and
    from then on :meth:`read` returns full rows by position in that order. ``store``: ``memory`` (float32
    in RAM, 4 D bytes a row), ``disk`` (float32 temporary file) or ``auto`` (memory up to ``spill_bytes``,
    then the file). Without a projection (``projection_dim`` None or >= D) the selection needs the full
    rows in memory, and they are kept there once.
    """

    def __init__(
        self,
        dim: int,
        projection_dim: int | None = 128,
        seed: int = 0,
        store: str = "auto",
        spill_bytes: int = SPILL_BYTES,
    ) -> None:
        """Empty pool for rows of ``dim`` floats, projected as :func:`greedy_coreset` does with ``seed``."""
        if store not in POOL_STORES:
            raise ValueError(f"pool store must be one of {POOL_STORES}, got {store!r}")
        self.dim, self.store, self.spill_bytes = int(dim), store, int(spill_bytes)
        self.projection = CoresetProjection(self.dim, projection_dim, seed)
        self.keys: list[str | None] = []  # [images] image keys (paths) in arrival order
        self.sizes: list[int] = []  # [images] rows of each image
        self._projected: list[Tensor | None] = []  # [images] float32 [rows, p] on the CPU
        self._full: list[Tensor] = []  # [images] float32 [rows, D] while the full rows are in memory
        self._file: IO[bytes] | None = None  # the temporary file once the full rows are on disk
        self._on_disk = 0  # rows written to the file
        self._points: Tensor | None = None  # after finish() without a projection: the full rows, in order
        self._arrival: Tensor | None = None  # after finish(): arrival row of each position [N_order]

    def __len__(self) -> int:
        """Number of rows added."""
        return sum(self.sizes)

    @property
    def projected_dim(self) -> int:
        """Columns of the projected rows."""
        return self.projection.out_dim

    @property
    def on_disk(self) -> bool:
        """True once the full rows are in the temporary file."""
        return self._file is not None

    def add(self, rows: Tensor, key: str | None = None) -> None:
        """Add the patch rows [R, D] of one image (any device and float dtype; copied as float32 to the CPU)."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must have shape [R, {self.dim}], got {tuple(rows.shape)}")
        if self._arrival is not None:
            raise RuntimeError("PatchPool.add() after finish(): start a new pool")
        rows = rows.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.keys.append(key)
        self.sizes.append(int(rows.shape[0]))
        if self.projection.weight is None:
            self._projected.append(rows)  # the selection works on the full rows: keep them once
            return
        self._projected.append(self.projection(rows))
        if self._file is None and self._wants_disk():
            self._spill()
        if self._file is None:
            self._full.append(rows)
        else:
            self._write(rows)

    def _wants_disk(self) -> bool:
        """True when the full rows (the new ones included) should go to the file."""
        if self.store == "auto":
            return 4 * self.dim * len(self) > self.spill_bytes
        return self.store == "disk"

    def _spill(self) -> None:
        """Move the full rows held in memory to a new temporary file (removed when closed)."""
        self._file = tempfile.TemporaryFile(prefix="adx_patch_pool_")
        for rows in self._full:
            self._write(rows)
        self._full = []

    def _write(self, rows: Tensor) -> None:
        """Append float32 rows [R, D] to the file."""
        assert self._file is not None
        self._file.write(rows.numpy().data)
        self._on_disk += rows.shape[0]

    def image_order(self) -> list[int]:
        """Canonical image order: by key with repeated keys dropped; arrival order when a key is missing."""
        return _canonical(self.keys)

    def finish(self, order: Sequence[int]) -> Tensor:
        """Projected rows [N_order, p] of images ``order``, concatenated; frees the per-image copies."""
        sizes = [self.sizes[i] for i in order]
        starts = np.cumsum([0, *self.sizes[:-1]]).tolist()
        points = torch.empty(sum(sizes), self.projected_dim)
        arrival = torch.empty(sum(sizes), dtype=torch.long)
        at = 0
        for i, size in zip(order, sizes, strict=True):
            chunk = self._projected[i]
            if chunk is None:
                raise ValueError(f"image {i} appears twice in the order")
            points[at : at + size] = chunk
            arrival[at : at + size] = torch.arange(starts[i], starts[i] + size)
            self._projected[i] = None
            at += size
        self._projected = []
        self._arrival = arrival
        if self.projection.weight is None:
            self._points = points
        elif self._file is not None:
            self._file.flush()
        return points

    def read(self, positions: Tensor) -> Tensor:
        """Full float32 rows [m, D] at ``positions`` [m] of the order given to :meth:`finish`."""
        if self._arrival is None:
            raise RuntimeError("PatchPool.read() before finish()")
        positions = positions.to(device="cpu", dtype=torch.long)
        if self._points is not None:
            return self._points.index_select(0, positions)
        arrival = self._arrival.index_select(0, positions)
        out = torch.empty(len(arrival), self.dim)
        if len(arrival) == 0:
            return out
        rows, where = torch.sort(arrival)  # read in file order
        if self._file is not None:
            out[where] = self._read_file(rows)
            return out
        ends = torch.tensor(np.cumsum(self.sizes), dtype=torch.long)
        image = torch.searchsorted(ends, rows, right=True)
        within = rows - (ends - torch.tensor(self.sizes, dtype=torch.long))[image]
        for i in torch.unique(image).tolist():
            mask = image == i
            out[where[mask]] = self._full[i].index_select(0, within[mask])
        return out

    def _read_file(self, rows: Tensor) -> Tensor:
        """Rows [m] (ascending) of the file -> float32 [m, D], one read per run of consecutive rows.

        Plain reads, not a memory map: a map would count the pages that the kernel reads ahead around every
        row in this process's resident memory (+3.5 GB reading 32,768 scattered 4 KiB rows of a 4 GB file).
        """
        assert self._file is not None
        unique, inverse = torch.unique_consecutive(rows, return_inverse=True)
        out = np.empty((len(unique), self.dim), dtype=np.float32)
        index = unique.numpy()
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        row_bytes = 4 * self.dim
        for start, stop in zip([0, *breaks.tolist()], [*breaks.tolist(), len(index)], strict=True):
            self._file.seek(int(index[start]) * row_bytes)
            view = memoryview(out[start:stop]).cast("B")
            if self._file.readinto(view) != len(view):
                raise OSError("the patch pool's temporary file is shorter than expected")
        return torch.from_numpy(out).index_select(0, inverse)

    def close(self) -> None:
        """Free the rows and remove the temporary file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._projected, self._full, self._points, self._arrival = [], [], None, None


def _encode_keys(keys: list[str | None], width: int) -> Tensor:
    """Keys as a zero-padded uint8 tensor [n, width] of their UTF-8 bytes."""
    out = torch.zeros(len(keys), width, dtype=torch.uint8)
    for i, key in enumerate(keys):
        data = (key or "").encode()
        if data:
            out[i, : len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return out


def _decode_keys(codes: Tensor) -> list[str]:
    """Inverse of :func:`_encode_keys`."""
    return [bytes(row).rstrip(b"\0").decode() for row in codes.tolist()]


def _canonical(keys: Sequence[str | None]) -> list[int]:
    """Indices of ``keys`` sorted as paths, the first of repeated keys only; all, in order, if one is None.

    Paths sort as the data listers sort them (``sorted`` over ``Path``), so a single process that reads the
    training images in listing order keeps that order.
    """
    if any(key is None for key in keys):
        return list(range(len(keys)))
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)  # type: ignore[arg-type]
    return [first[key] for key in sorted(first, key=PurePath)]


def _rows_of(images: list[int], starts: Tensor, sizes: Tensor) -> Tensor:
    """Row indices [sum sizes] of ``images`` in a concatenation with per-image ``starts`` and ``sizes``."""
    idx = torch.tensor(images, dtype=torch.long)
    size = sizes.index_select(0, idx)
    total = int(size.sum())
    first = torch.cumsum(size, 0) - size  # where each image begins in the output
    shift = torch.repeat_interleave(starts.index_select(0, idx) - first, size, output_size=total)
    return torch.arange(total) + shift


def coreset_bank(pool: PatchPool, ratio: float, progress: bool = True, desc: str = "coreset") -> Tensor:
    """Memory bank [n, D] (float32, CPU): the greedy coreset of every rank's pool, in the canonical order.

    Collective inside a process group (every rank must call it, with a pool of any size, even empty);
    the result is the same on every rank. Closes nothing: call ``pool.close()`` afterwards.
    """
    rank = distributed.rank()
    order = pool.image_order()
    local_keys = [pool.keys[i] for i in order]
    keyless = bool(distributed.all_reduce_max(torch.tensor([int(any(k is None for k in local_keys))])))
    sizes = distributed.gather_rows(torch.tensor([pool.sizes[i] for i in order], dtype=torch.long))
    keys: list[str] | None = None
    if not keyless:
        width = max([len(k.encode()) for k in local_keys if k is not None] + [1])
        width = int(distributed.all_reduce_max(torch.tensor([width]))[0])
        keys = _decode_keys(distributed.gather_rows(_encode_keys(local_keys, width)))
    rank_rows = distributed.gather_rows(torch.tensor([sum(pool.sizes[i] for i in order)], dtype=torch.long))
    points = distributed.gather_rows(pool.finish(order))  # [N_gathered, p] in rank order
    if len(points) == 0:
        raise RuntimeError("no patch features were collected: the training set gave no images")
    starts = torch.cumsum(sizes, 0) - sizes  # [images] first gathered row of each image
    images = list(range(len(sizes))) if keys is None else _canonical(keys)
    if images != list(range(len(sizes))):
        perm = _rows_of(images, starts, sizes)  # canonical position -> gathered row
        points = points.index_select(0, perm)
    else:
        perm = None
    n = sample_size(len(points), ratio)
    start = pool.projection.start_index(len(points))
    selected = select_coreset(points, n, start, progress, f"{desc} of {len(points):,} patches")
    del points
    gathered = selected if perm is None else perm.index_select(0, selected)  # gathered row of each bank row
    rank_end = torch.cumsum(rank_rows, 0)
    owner = torch.searchsorted(rank_end, gathered, right=True)
    mine = torch.nonzero(owner == rank)[:, 0]
    local = gathered.index_select(0, mine) - (rank_end[rank] - rank_rows[rank])
    rows = distributed.gather_rows(pool.read(local))
    where = distributed.gather_rows(mine)
    bank = torch.empty(n, pool.dim)
    bank[where] = rows
    return bank
