"""Greedy k-center coreset: the fast implementation selects exactly what the plain algorithm selects."""

from __future__ import annotations

import sys

import pytest
import torch
from tqdm import tqdm

from adx.models.components import coreset
from adx.models.components.coreset import (
    CoresetProjection,
    greedy_coreset,
    greedy_coreset_reference,
    sample_size,
    select_coreset,
)


def _blobs(n: int, dim: int, centres: int, seed: int) -> torch.Tensor:
    """Gaussian blobs [n, dim] with uneven spreads."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=gen) * 4
    spread = torch.rand(centres, 1, generator=gen) + 0.2
    which = torch.randint(centres, (n,), generator=gen)
    return means[which] + spread[which] * torch.randn(n, dim, generator=gen)


def _datasets() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    low_rank = torch.rand(5000, 3, generator=gen) @ torch.randn(3, 40, generator=gen)
    duplicates = torch.randn(800, 24, generator=gen)[torch.randint(800, (5000,), generator=gen)]
    # a few far outliers make the rounding allowance of the principal-axis bounds large for every point
    outliers = _blobs(5000, 96, 12, seed=2)
    outliers[::1000] *= 1e4
    return {
        "blobs": _blobs(5000, 64, 12, seed=1),
        "uniform": torch.rand(5000, 64, generator=gen),
        "low_rank": low_rank,
        "duplicates": duplicates,
        "wide": _blobs(5000, 128, 40, seed=3),  # more dimensions than the principal axes kept
        "outliers": outliers,
        "grid": torch.stack(torch.meshgrid(torch.arange(50.0), torch.arange(100.0), indexing="ij"), -1).view(
            -1, 2
        ),
    }


DATASETS = _datasets()


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Small problems: one intra-op thread avoids OpenMP stalls when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["default", "sparse_from_start"])
def phases(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with the default dense/sparse switch, and with the sparse phase from the first step."""
    if request.param == "sparse_from_start":
        monkeypatch.setattr(coreset, "_DENSE_CHECK_EVERY", 1)
        monkeypatch.setattr(coreset, "_DENSE_FRACTION", 2.0)
    return request.param


@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("projection_dim", [None, 16])
def test_fast_equals_reference(name: str, projection_dim: int | None, phases: str) -> None:
    features = DATASETS[name]
    ref = greedy_coreset_reference(features, 500, projection_dim=projection_dim, seed=3)
    fast = greedy_coreset(features, 500, projection_dim=projection_dim, seed=3, progress=False)
    assert fast.dtype == torch.long and fast.shape == (500,)
    assert torch.equal(fast, ref)
    if name not in ("duplicates", "grid"):
        assert len(set(fast.tolist())) == 500


def test_more_centres_than_distinct_points(phases: str) -> None:
    features = torch.randn(300, 8)[torch.randint(300, (1000,))]
    ref = greedy_coreset_reference(features, 600, projection_dim=None, seed=0)
    fast = greedy_coreset(features, 600, projection_dim=None, seed=0, progress=False)
    assert torch.equal(fast, ref)


def test_many_steps_rebuild(phases: str) -> None:
    features = _blobs(3000, 8, 5, seed=4)
    ref = greedy_coreset_reference(features, 2900, projection_dim=None, seed=1)
    fast = greedy_coreset(features, 2900, projection_dim=None, seed=1, progress=False)
    assert torch.equal(fast, ref)


def test_small_and_edge_sizes() -> None:
    features = torch.randn(50, 5)
    assert torch.equal(greedy_coreset(features, 50, progress=False), torch.arange(50))
    assert torch.equal(greedy_coreset(features, 80, progress=False), torch.arange(50))
    assert torch.equal(greedy_coreset_reference(features, 80), torch.arange(50))
    one = greedy_coreset(features, 1, seed=5, progress=False)
    assert one.shape == (1,) and torch.equal(one, greedy_coreset_reference(features, 1, seed=5))
    assert torch.equal(greedy_coreset(features, 2, progress=False), greedy_coreset_reference(features, 2))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="positive"):
            greedy_coreset(features, bad)
        with pytest.raises(ValueError, match="positive"):
            greedy_coreset_reference(features, bad)
    with pytest.raises(ValueError, match="2-D"):
        greedy_coreset(torch.randn(10), 3)


def test_first_index_and_greedy_property() -> None:
    features = _blobs(2000, 10, 6, seed=7)
    idx = greedy_coreset(features, 100, projection_dim=None, seed=11, progress=False)
    # every new centre is the point farthest from the previous ones
    for step in (1, 10, 99):
        dist = torch.cdist(features, features[idx[:step]]).min(1).values
        assert dist[idx[step]] == pytest.approx(dist.max().item(), rel=1e-5)


def test_determinism_and_seed() -> None:
    features = _blobs(3000, 32, 8, seed=2)
    a = greedy_coreset(features, 200, seed=0, progress=False)
    b = greedy_coreset(features, 200, seed=0, progress=False)
    c = greedy_coreset(features, 200, seed=1, progress=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_projection_and_dtypes() -> None:
    features = _blobs(2000, 40, 6, seed=3)
    # projection_dim >= D means no projection
    assert torch.equal(
        greedy_coreset(features, 100, projection_dim=40, progress=False),
        greedy_coreset(features, 100, projection_dim=None, progress=False),
    )
    ref = greedy_coreset_reference(features.double(), 100, projection_dim=8)
    assert torch.equal(greedy_coreset(features.double(), 100, projection_dim=8, progress=False), ref)
    half = features.half()
    assert torch.equal(
        greedy_coreset(half, 100, projection_dim=8, progress=False), greedy_coreset_reference(half, 100, 8)
    )
    with pytest.raises(ValueError, match="projection_dim"):
        greedy_coreset(features, 10, projection_dim=0)


def test_progress_bar(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coreset, "_LOG_SECONDS", 0.0)  # stderr is not a terminal here: log lines
    greedy_coreset(torch.randn(600, 4), 300, progress=True, desc="bank")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 2 and all(line.startswith("bank: ") for line in lines), lines
    assert "300/300 points" in lines[-1] and "elapsed, ETA " in lines[-1] and "pt/s" in lines[-1]
    assert "\r" not in "".join(lines)
    with tqdm(total=1, file=sys.stderr):  # an outer bar (Lightning's): no cursor moves in the log lines
        greedy_coreset(torch.randn(600, 4), 300, progress=True, desc="bank")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bank")]
    assert lines and not any("\x1b" in line for line in lines)


def test_projection_in_parts_selects_the_same() -> None:
    features = _blobs(6000, 48, 8, seed=12)
    projection = CoresetProjection(48, 16, seed=4)
    whole = projection(features)
    # each row is computed independently of the other rows in its call (MKL: calls of 8 rows or more)
    for size in (8, 64, 250, 1600):
        assert torch.equal(torch.cat([projection(part) for part in features.split(size)]), whole), size
    start = projection.start_index(len(features))
    fast = greedy_coreset(features, 300, projection_dim=16, seed=4, progress=False)
    assert torch.equal(select_coreset(whole, 300, start, progress=False), fast)
    identity = CoresetProjection(48, None, seed=4)
    assert identity.weight is None and identity.out_dim == 48 and torch.equal(identity(features), features)
    assert torch.equal(
        select_coreset(features, 300, identity.start_index(6000), progress=False),
        greedy_coreset(features, 300, projection_dim=None, seed=4, progress=False),
    )
    assert torch.equal(select_coreset(features[:5], 9, 0, progress=False), torch.arange(5))
    with pytest.raises(ValueError, match="start_index"):
        select_coreset(features, 10, 6000)


def test_sample_size() -> None:
    assert sample_size(1000, 0.1) == 100
    assert sample_size(1000, 1.0) == 1000
    assert sample_size(5, 0.01) == 1
    assert sample_size(327680, 0.1) == 32768
    for bad in (0.0, -0.1, 1.5, float("nan"), "x", None):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            sample_size(100, bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cuda_reference() -> None:
    features = _blobs(4000, 32, 8, seed=5).cuda()
    fast = greedy_coreset(features, 300, projection_dim=16, progress=False)
    assert fast.is_cuda
    assert torch.equal(fast, greedy_coreset_reference(features, 300, projection_dim=16))


def test_thread_switching_keeps_the_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    features = _blobs(6000, 24, 10, seed=11)
    reference = greedy_coreset_reference(features, 400, projection_dim=16)
    threads = torch.get_num_threads()
    seen: list[int] = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: max(threads, 2))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real_set(n)))
    monkeypatch.setattr(coreset, "_PROBE_SECONDS", 0.0)  # probe and switch at every check
    monkeypatch.setattr(coreset, "_RUN_SECONDS", 0.0)
    fast = greedy_coreset(features, 400, projection_dim=16, progress=False)
    assert torch.equal(fast, reference)
    assert 1 in seen and len(seen) > 10, "the governor switched thread counts many times"
    assert seen[-1] == max(threads, 2), "the thread count is restored afterwards"
    real_set(threads)
