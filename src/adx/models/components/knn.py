"""Exact Euclidean nearest-neighbour search over a memory bank: faiss when available, torch otherwise."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adx.inference import exporting

try:  # faiss is a declared dependency, but keep the torch path usable without it
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is missing
    faiss = None

__all__ = ["NearestNeighbours", "faiss_available", "faiss_num_gpus", "knn_torch"]

# Bound on the float32 elements of one [chunk, M] distance block of the torch backend (64 Mi = 256 MiB).
_TORCH_BLOCK_ELEMENTS = 1 << 26
# Bank rows per block of a recorded graph, whose query count is dynamic: the blocks follow the (static)
# bank, so a batch of N query rows holds N x 4096 distances at a time instead of N x M.
GRAPH_BANK_BLOCK = 4096
_BACKENDS = (None, "auto", "torch", "faiss")


def faiss_available() -> bool:
    """True when faiss could be imported."""
    return faiss is not None


def faiss_num_gpus() -> int:
    """Number of GPUs faiss can use (0 for faiss-cpu builds or without faiss)."""
    if faiss is None or not hasattr(faiss, "get_num_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # pragma: no cover - defensive: broken GPU runtime
        return 0


def _as_float32(x: Tensor) -> Tensor:
    """[R, D] tensor as contiguous float32, detached (no copy when it already is)."""
    return x.detach().to(dtype=torch.float32).contiguous()


class NearestNeighbours:
    """Exact k-nearest-neighbour index over ``bank`` [M, D] (Euclidean distance).

    Backends: ``"faiss-cpu"`` (``IndexFlatL2``; CPU queries), ``"faiss-gpu"`` (faiss built with GPU
    support and CUDA queries) and ``"torch"`` (chunked matrix products on the queries' device: forced with
    ``backend="torch"``, used without faiss, and for CUDA queries when faiss has no GPU). The ``backend``
    attribute names the one for the bank's device after construction, then the one the last search used.
    Results come back on the queries' device. faiss keeps its default OpenMP threads: measured on 2 cores,
    alternating torch and faiss work costs the sum of both (no oversubscription), and 1 faiss thread is
    1.6x slower.
    """

    def __init__(self, bank: Tensor, backend: str | None = None) -> None:
        """Index ``bank`` [M, D]; ``backend`` None/"auto" picks, "torch" or "faiss" forces one."""
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {_BACKENDS}")
        if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
            raise ValueError(f"bank must be a non-empty [M, D] tensor, got shape {tuple(bank.shape)}")
        if backend == "faiss" and faiss is None:
            raise ImportError("backend='faiss' requested but faiss is not importable (pip install faiss-cpu)")
        self.size, self.dim = int(bank.shape[0]), int(bank.shape[1])
        self.bank = _as_float32(bank)  # [M, D], on the bank's device until a search needs it elsewhere
        self._bank_sq: Tensor | None = None  # [M] squared norms, torch backend
        self._forced_torch = backend == "torch" or faiss is None
        self._cpu_index: Any = None  # faiss IndexFlatL2, built on first use
        self._gpu_index: Any = None
        self._gpu_resources: Any = None
        if self._forced_torch:
            self.backend = "torch"
        elif bank.is_cuda:
            self.backend = "faiss-gpu" if faiss_num_gpus() > 0 else "torch"
        else:
            self.backend = "faiss-cpu"
            self._cpu()

    def __len__(self) -> int:
        """Number of bank vectors M."""
        return self.size

    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """k nearest bank rows of ``queries`` [N, D] -> (distances [N, k] float32 >= 0, indices [N, k] int64).

        Rows are sorted by increasing distance; both tensors are on the queries' device.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape [N, {self.dim}], got {tuple(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > self.size:
            raise ValueError(f"k={k} exceeds the number of memory-bank vectors M={self.size}")
        device = queries.device
        if queries.shape[0] == 0:
            return torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.long, device=device)
        queries = _as_float32(queries)
        if self._forced_torch or (queries.is_cuda and faiss_num_gpus() == 0):
            self.backend = "torch"
            return self._search_torch(queries, k)
        if queries.is_cuda:
            index = self._gpu(queries.device)
            self.backend = "faiss-gpu"
        else:
            index = self._cpu()
            self.backend = "faiss-cpu"
        sq_dist, idx = index.search(queries.cpu().numpy(), k)
        dist = torch.from_numpy(sq_dist).clamp_min_(0).sqrt_()
        return dist.to(device), torch.from_numpy(idx).to(device=device, dtype=torch.long)

    def _cpu(self) -> Any:
        """The faiss CPU index (built on first use)."""
        if self._cpu_index is None:
            self._cpu_index = faiss.IndexFlatL2(self.dim)
            self._cpu_index.add(self.bank.cpu().numpy())
        return self._cpu_index

    def _gpu(self, device: torch.device) -> Any:
        """The faiss GPU index on ``device`` (built on first use)."""
        if self._gpu_index is None:  # pragma: no cover - needs faiss GPU support
            self._gpu_resources = faiss.StandardGpuResources()
            ordinal = device.index if device.index is not None else torch.cuda.current_device()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, ordinal, self._cpu())
        return self._gpu_index

    def _search_torch(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Chunked exact search on the queries' device: ([N, k] distances, [N, k] indices)."""
        if self.bank.device != queries.device:
            self.bank = self.bank.to(queries.device)
            self._bank_sq = None
        if self._bank_sq is None:
            self._bank_sq = self.bank.square().sum(1)
        return knn_torch(queries, self.bank, k, self._bank_sq)


def knn_torch(
    queries: Tensor, bank: Tensor, k: int = 1, bank_sq: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Exact k nearest rows of ``bank`` [M, D] for ``queries`` [N, D] by chunked matmul + top-k.

    Pure torch with no branches on tensor values, so it traces and exports; chunks bound one [c, M]
    distance block to 256 MiB. Returns (distances [N, k] >= 0 sorted ascending, indices [N, k] int64).
    """
    if bank_sq is None:
        bank_sq = bank.square().sum(1)
    if exporting():  # a graph: the query count is dynamic, so split the (static) bank instead
        return _knn_bank_blocks(queries, bank, k, bank_sq)
    chunk = max(1, _TORCH_BLOCK_ELEMENTS // max(1, bank.shape[0]))
    dists, idxs = [], []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk]
        # ||q - b||^2 = ||b||^2 - 2 q.b + ||q||^2, the last term added after the top-k (same order)
        block = torch.addmm(bank_sq, q, bank.T, alpha=-2.0)  # [c, M]
        value, index = torch.topk(block, k, dim=1, largest=False, sorted=True)
        dists.append(value + q.square().sum(1, keepdim=True))
        idxs.append(index)
    if not dists:
        return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=queries.device)
    return torch.cat(dists).clamp_min(0).sqrt(), torch.cat(idxs)


def _knn_bank_blocks(queries: Tensor, bank: Tensor, k: int, bank_sq: Tensor) -> tuple[Tensor, Tensor]:
    """knn_torch over static blocks of ``GRAPH_BANK_BLOCK`` bank rows, merged by a second top-k.

    Every loop bound is the bank's size, fixed when the graph is recorded; the exact same neighbours as one
    block (ties aside), with [N, block] instead of [N, M] distances alive at a time in the runtimes.
    """
    m = bank.shape[0]
    values, indices = [], []
    for start in range(0, m, GRAPH_BANK_BLOCK):
        stop = min(m, start + GRAPH_BANK_BLOCK)
        block = torch.addmm(bank_sq[start:stop], queries, bank[start:stop].T, alpha=-2.0)
        value, index = torch.topk(block, min(k, stop - start), dim=1, largest=False, sorted=True)
        values.append(value)
        indices.append(index + start)
    value, index = torch.cat(values, 1), torch.cat(indices, 1)
    if len(values) > 1:
        value, which = torch.topk(value, k, dim=1, largest=False, sorted=True)
        index = torch.gather(index, 1, which)
    return (value + queries.square().sum(1, keepdim=True)).clamp_min(0).sqrt(), index
