"""Exact nearest-neighbour search over a memory bank (faiss when available, chunked torch otherwise)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:  # faiss is optional at runtime: fall back to torch when the import fails
    import faiss
except ImportError:  # pragma: no cover - exercised only without faiss
    faiss = None

__all__ = ["NearestNeighbours", "faiss_available"]

# Bound on the float32 elements of one [chunk, M] distance block in the torch backend (~256 MiB).
_TORCH_BLOCK_ELEMENTS = 1 << 26


def faiss_available() -> bool:
    """True when the faiss module could be imported."""
    return faiss is not None


def _as_float32(x: Tensor) -> Tensor:
    """[R, D] tensor as contiguous float32 (no copy when it already is)."""
    return x.detach().to(dtype=torch.float32).contiguous()


class NearestNeighbours:
    """Exact Euclidean k-nearest-neighbour index over ``bank`` [M, D].

    Backends: ``"faiss-gpu"`` (faiss with GPUs and a CUDA bank), ``"faiss-cpu"`` (``IndexFlatL2``) or
    ``"torch"`` (chunked ``torch.cdist``). Results come back on the queries' device.
    """

    def __init__(self, bank: Tensor, backend: str | None = None) -> None:
        """Index ``bank`` [M, D]; ``backend`` None picks automatically, "torch" / "faiss" force one."""
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"bank must be a non-empty [M, D] tensor, got shape {tuple(bank.shape)}")
        if backend not in (None, "torch", "faiss", "faiss-cpu", "faiss-gpu"):
            raise ValueError(f"unknown backend {backend!r}: use None, 'torch', 'faiss', 'faiss-cpu' or 'faiss-gpu'")
        if backend is not None and backend.startswith("faiss") and faiss is None:
            raise ImportError(f"backend {backend!r} requested but faiss is not importable")
        self.size, self.dim = int(bank.shape[0]), int(bank.shape[1])
        self.bank = _as_float32(bank)  # [M, D], kept for the torch backend and for re-indexing
        self._index: Any = None
        self._gpu_resources: Any = None
        if backend == "torch" or faiss is None:
            self.backend = "torch"
            return
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        want_gpu = backend == "faiss-gpu" or (backend in (None, "faiss") and bank.is_cuda)
        if backend == "faiss-gpu" and gpus == 0:
            raise RuntimeError("backend 'faiss-gpu' requested but faiss reports no GPUs")
        cpu_index = faiss.IndexFlatL2(self.dim)
        cpu_index.add(self.bank.cpu().numpy())
        if want_gpu and gpus > 0:
            self._gpu_resources = faiss.StandardGpuResources()
            device = bank.device.index if bank.is_cuda and bank.device.index is not None else 0
            self._index = faiss.index_cpu_to_gpu(self._gpu_resources, device, cpu_index)
            self.backend = "faiss-gpu"
        else:
            self._index = cpu_index
            self.backend = "faiss-cpu"
        if self.backend != "torch":
            self.bank = self.bank.cpu() if not bank.is_cuda else self.bank

    def __len__(self) -> int:
        """Number of indexed bank vectors M."""
        return self.size

    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """k nearest bank rows of ``queries`` [N, D]: (distances [N, k] float32 >= 0, indices [N, k] int64)."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got shape {tuple(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > self.size:
            raise ValueError(f"k={k} exceeds the number of bank vectors M={self.size}")
        device = queries.device
        if queries.shape[0] == 0:
            empty = torch.empty(0, k, device=device)
            return empty, empty.long()
        if self.backend == "torch":
            dist, idx = self._search_torch(_as_float32(queries), k)
        else:
            q = _as_float32(queries).cpu().numpy()
            sq, idx_np = self._index.search(q, k)
            dist = torch.from_numpy(sq).clamp_min_(0).sqrt_()
            idx = torch.from_numpy(idx_np).long()
        return dist.to(device), idx.to(device)

    def _search_torch(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Chunked exact search with torch.cdist: ([N, k] distances, [N, k] indices) on the bank's device."""
        bank = self.bank.to(queries.device)
        n = queries.shape[0]
        chunk = max(1, _TORCH_BLOCK_ELEMENTS // self.size)
        dists = torch.empty(n, k, device=queries.device)
        idxs = torch.empty(n, k, dtype=torch.long, device=queries.device)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            block = torch.cdist(queries[start:stop], bank, compute_mode="use_mm_for_euclid_dist")  # [c, M]
            if k == 1:
                value, index = block.min(dim=1, keepdim=True)
            else:
                value, index = torch.topk(block, k, dim=1, largest=False, sorted=True)
            dists[start:stop] = value
            idxs[start:stop] = index
        return dists.clamp_min_(0), idxs
