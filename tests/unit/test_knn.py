"""NearestNeighbours: faiss and torch backends against brute force."""

from __future__ import annotations

import pytest
import torch

from adx.models.components.knn import NearestNeighbours, faiss_available

BACKENDS = [
    "torch",
    pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="no faiss")),
]


def _brute_force(bank: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 k-NN: ([N, k] distances, [N, k] indices)."""
    dist = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    value, index = torch.topk(dist, k, dim=1, largest=False, sorted=True)
    return value, index


def _check(bank: torch.Tensor, queries: torch.Tensor, k: int, backend: str) -> None:
    """Distances within 1e-4 relative of brute force; indices equal except where distances tie."""
    nn = NearestNeighbours(bank, backend=backend)
    dist, idx = nn.search(queries, k=k)
    ref_dist, ref_idx = _brute_force(bank, queries, k)
    assert dist.shape == idx.shape == (queries.shape[0], k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.long
    assert (dist >= 0).all()
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-4, atol=1e-5)
    # a differing index must point at a bank row exactly as far (a tie) as the reference one
    true_dist = torch.linalg.vector_norm(bank[idx].double() - queries[:, None].double(), dim=-1)
    torch.testing.assert_close(true_dist, ref_dist, rtol=1e-4, atol=1e-5)
    assert (idx == ref_idx).float().mean() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5])
def test_matches_brute_force(backend: str, k: int) -> None:
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(2000, 48, generator=gen)
    queries = torch.randn(300, 48, generator=gen)
    _check(bank, queries, k, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_in_bank_and_dtypes(backend: str) -> None:
    gen = torch.Generator().manual_seed(1)
    bank = torch.rand(500, 16, generator=gen, dtype=torch.float64) * 3 + 1  # float64 and off-centre
    nn = NearestNeighbours(bank, backend=backend)
    dist, idx = nn.search(bank[:50].half().float().double(), k=1)
    assert dist.dtype == torch.float32
    dist, idx = nn.search(bank[:50], k=1)
    assert torch.equal(idx[:, 0], torch.arange(50))
    assert dist.max().item() < 1e-2
    _check(bank.float(), torch.rand(40, 16, generator=gen).half().float() * 3 + 1, 3, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_queries(backend: str) -> None:
    gen = torch.Generator().manual_seed(2)
    bank = torch.randn(300, 8, generator=gen)
    queries = torch.randn(20, 8, generator=gen).half()
    dist, idx = NearestNeighbours(bank, backend=backend).search(queries, k=2)
    ref_dist, _ = _brute_force(bank, queries.float(), 2)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-4, atol=1e-5)


def test_backend_names_and_torch_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    from adx.models.components import knn

    bank = torch.randn(100, 4)
    assert NearestNeighbours(bank, backend="torch").backend == "torch"
    auto = NearestNeighbours(bank)
    assert auto.backend == ("faiss-cpu" if faiss_available() else "torch")
    assert len(auto) == 100 and auto.size == 100
    monkeypatch.setattr(knn, "_TORCH_BLOCK_ELEMENTS", 100 * 7)  # 7 queries per block
    _check(bank, torch.randn(30, 4), 4, "torch")


@pytest.mark.parametrize("k", [1, 4])
def test_graph_path_splits_the_bank_and_finds_the_same_neighbours(
    monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    """While a graph is recorded the search loops over static bank blocks (13 rows here: 8 blocks)."""
    from adx.models.components import knn

    gen = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(100, 6, generator=gen), torch.randn(40, 6, generator=gen)
    blocks = []
    real_addmm = torch.addmm
    monkeypatch.setattr(knn, "GRAPH_BANK_BLOCK", 13)
    monkeypatch.setattr(knn, "exporting", lambda: True)
    monkeypatch.setattr(
        knn.torch, "addmm", lambda b, q, m, **kw: blocks.append(m.shape[1]) or real_addmm(b, q, m, **kw)
    )
    dist, idx = knn.knn_torch(queries, bank, k)
    monkeypatch.undo()
    assert blocks == [13] * 7 + [9]  # the distance blocks are [40, 13] at most, never [40, 100]
    ref_dist, ref_idx = _brute_force(bank, queries, k)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-4, atol=1e-5)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend: str) -> None:
    nn = NearestNeighbours(torch.randn(10, 3), backend=backend)
    with pytest.raises(ValueError, match=r"k=11.*M=10"):
        nn.search(torch.randn(2, 3), k=11)
    with pytest.raises(ValueError, match="shape"):
        nn.search(torch.randn(2, 4))
    with pytest.raises(ValueError):
        nn.search(torch.randn(2, 3), k=0)
    dist, idx = nn.search(torch.randn(0, 3), k=2)
    assert dist.shape == idx.shape == (0, 2)
    with pytest.raises(ValueError):
        NearestNeighbours(torch.randn(0, 3))
    with pytest.raises(ValueError):
        NearestNeighbours(torch.randn(4, 3), backend="annoy")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_queries() -> None:
    gen = torch.Generator().manual_seed(3)
    bank = torch.randn(1000, 32, generator=gen)
    queries = torch.randn(100, 32, generator=gen)
    nn = NearestNeighbours(bank.cuda())
    dist, idx = nn.search(queries.cuda(), k=3)
    assert dist.is_cuda and idx.is_cuda
    ref_dist, _ = _brute_force(bank, queries, 3)
    torch.testing.assert_close(dist.cpu().double(), ref_dist, rtol=1e-4, atol=1e-5)
