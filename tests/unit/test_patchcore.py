"""PatchCore's training pool: compact storage, canonical order, gathering over processes, embed_dim check."""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adx import distributed
from adx.models.components import pool as pool_module
from adx.models.components.coreset import greedy_coreset, sample_size
from adx.models.components.pool import PatchPool, coreset_bank
from adx.models.components.weights import restoring_weights
from adx.models.patchcore import PatchCore
from adx.models.patchcore.torch_model import PatchCoreModel


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Small problems: one intra-op thread avoids OpenMP stalls when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images_rows(n_images: int, rows: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    """Per-image patch rows [rows, dim] drawn around a few shared centres (clustered, like real patches)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, dim, generator=gen) * 3
    out = []
    for _ in range(n_images):
        which = torch.randint(6, (rows,), generator=gen)
        out.append(centres[which] + torch.randn(rows, dim, generator=gen))
    return out


def _expected(rows: list[torch.Tensor], ratio: float, projection_dim: int | None, seed: int) -> torch.Tensor:
    """The bank of the pool held whole in memory and subsampled in one call (the previous code path)."""
    whole = torch.cat(rows)
    return whole[greedy_coreset(whole, sample_size(len(whole), ratio), projection_dim, seed, progress=False)]


@pytest.mark.parametrize("store", ["memory", "disk", "auto"])
@pytest.mark.parametrize("projection_dim", [16, None])
def test_compact_pool_gives_the_same_bank(store: str, projection_dim: int | None) -> None:
    rows = _images_rows(9, 200, 40, seed=1)
    pool = PatchPool(
        40, projection_dim, seed=3, store=store, spill_bytes=4 * 40 * 700
    )  # auto spills at image 4
    for r in rows:
        pool.add(r)
    assert pool.on_disk == (projection_dim is not None and store != "memory")
    bank = coreset_bank(pool, 0.05, progress=False)
    pool.close()
    assert torch.equal(bank, _expected(rows, 0.05, projection_dim, seed=3))


def test_keys_order_the_pool_and_repeats_count_once() -> None:
    rows = _images_rows(6, 150, 24, seed=2)
    keys = [f"train/good/{i:03d}.png" for i in range(6)]
    arrival = [4, 1, 5, 0, 3, 2, 1]  # shuffled, image 1 twice (a DistributedSampler pad)
    pool = PatchPool(24, 8, seed=0, store="disk")
    for i in arrival:
        pool.add(rows[i], keys[i])
    assert len(pool) == 7 * 150
    bank = coreset_bank(pool, 0.1, progress=False)
    assert torch.equal(bank, _expected(rows, 0.1, 8, seed=0))  # as if loaded in path order, once each


def test_keys_sort_as_the_data_listers_sort_paths() -> None:
    keys = ["/d/a-b/c.png", "/d/a/b.png", "/d/a/a.png", "/d/a/b.png"]  # "-" < "/" as characters, not as paths
    order = pool_module._canonical(keys)
    assert [keys[i] for i in order] == [str(p) for p in sorted({Path(k) for k in keys})]
    assert order == [2, 1, 0]
    assert pool_module._canonical(["b", None, "a"]) == [0, 1, 2]  # a missing key: arrival order


def test_read_back_and_errors() -> None:
    rows = _images_rows(3, 10, 8)
    pool = PatchPool(8, 4, store="disk")
    for r in rows:
        pool.add(r.double())
    with pytest.raises(RuntimeError, match="before finish"):
        pool.read(torch.tensor([0]))
    pool.finish([2, 0, 1])
    got = pool.read(torch.tensor([15, 0, 1, 2, 15, 29]))  # a run of rows and a repeat
    assert torch.equal(
        got, torch.stack([rows[0][5], rows[2][0], rows[2][1], rows[2][2], rows[0][5], rows[1][9]])
    )
    assert pool.read(torch.tensor([], dtype=torch.long)).shape == (0, 8)
    with pytest.raises(RuntimeError, match="after finish"):
        pool.add(rows[0])
    pool.close()
    with pytest.raises(ValueError, match="shape"):
        PatchPool(8).add(torch.zeros(3, 9))
    with pytest.raises(ValueError, match="pool store"):
        PatchPool(8, store="ram")
    with pytest.raises(RuntimeError, match="no patch features"):
        coreset_bank(PatchPool(8), 0.1, progress=False)


# ---- the model -------------------------------------------------------------------------------------------
def _model(**kw: object) -> PatchCoreModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return PatchCoreModel(pretrained=False, coreset_ratio=0.1, progress=False, **kw)


def _batches(n: int, batch: int = 4, size: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(n, 3, size, size, generator=gen)
    return list(images.split(batch))


@pytest.mark.parametrize("pool", ["auto", "disk"])
def test_model_bank_and_scores_unchanged(pool: str) -> None:
    batches = _batches(10)
    model = _model(pool=pool)
    with torch.inference_mode():
        whole = torch.cat([model.embed(b).permute(0, 2, 3, 1).reshape(-1, 152) for b in batches])
        for b in batches:
            model.update(b)
        model.fit()
        scores, maps = model(batches[0])
    expected = whole[greedy_coreset(whole, sample_size(len(whole), 0.1), 128, 0, progress=False)]
    assert torch.equal(model.memory_bank, expected)
    reference = _model(pool="memory")
    reference.load_state_dict(model.state_dict())
    with torch.inference_mode():
        ref_scores, ref_maps = reference(batches[0])
    assert torch.equal(scores, ref_scores) and torch.equal(maps, ref_maps)


def test_adapter_passes_image_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = PatchCore(pretrained=False, progress=False)
    seen: list[object] = []
    monkeypatch.setattr(module.model, "update", lambda images, keys=None: seen.append(keys))
    module.training_step({"image": torch.zeros(2, 3, 64, 64), "path": ["b.png", "a.png"]}, 0)
    assert seen == [["b.png", "a.png"]]


def test_embed_dim_above_the_channels_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError) as info:
        _model(embed_dim=1024)
    message = str(info.value)
    assert "embed_dim 1024 exceeds the 152 channels of tf_efficientnet_lite0 at strides (8, 16)" in message
    assert "--model.embed_dim 152 or less" in message and "null" in message
    assert _model(embed_dim=152).memory_bank.shape[1] == 152
    with pytest.raises(ValueError, match="positive"):
        _model(embed_dim=0)
    with restoring_weights(), pytest.warns(UserWarning, match="exceeds the 152 channels"):
        PatchCoreModel(coreset_ratio=0.1, embed_dim=1024)  # an old checkpoint still loads


# ---- several processes -----------------------------------------------------------------------------------
class _FakeGroup:
    """Collectives of ``world`` threads, one per rank, for adx.distributed's helpers."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.local = threading.local()
        self.calls = 0

    def rank(self) -> int:
        return self.local.rank

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[self.rank()] = x
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody writes the next slot before all have read this one
        if self.rank() == 0:
            self.calls += 1
        return parts  # type: ignore[return-value]

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(x))

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(x)).amax(0)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(x)).sum(0)

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("gather_rows", "all_reduce_max", "all_reduce_sum", "rank"):
            monkeypatch.setattr(distributed, name, getattr(self, name))
        monkeypatch.setattr(distributed, "world_size", lambda: self.world)
        monkeypatch.setattr(distributed, "is_distributed", lambda: True)

    def run(self, work: Callable[[int], object]) -> list[object]:
        """``work(rank)`` on every rank's thread; their results in rank order."""
        results: list[object] = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = work(rank)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def _shards(n: int, world: int, seed: int) -> list[list[int]]:
    """DistributedSampler's split: a seeded permutation padded by repeats, every world-th index per rank."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    order += order[: (-n) % world]
    return [order[r::world] for r in range(world)]


def test_two_ranks_build_the_one_process_bank(monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.cat(_batches(11))  # 11 images: one rank gets a padded repeat
    paths = [f"/data/train/good/{i:03d}.png" for i in range(11)]
    single = _model()
    ranks = [copy.deepcopy(single) for _ in range(2)]  # same random weights on every rank
    with torch.inference_mode():
        for idx in torch.randperm(11, generator=torch.Generator().manual_seed(1)).split(3):  # shuffled
            single.update(images[idx], [paths[i] for i in idx.tolist()])
        single.fit()
    group = _FakeGroup(2)
    group.patch(monkeypatch)

    def rank_fit(rank: int) -> torch.Tensor:
        model = ranks[rank]
        shard = _shards(11, 2, seed=7)[rank]
        with torch.inference_mode():
            for start in range(0, len(shard), 4):
                idx = shard[start : start + 4]
                model.update(images[idx], [paths[i] for i in idx])
            model.fit()
        return model.memory_bank

    banks = group.run(rank_fit)
    assert group.calls > 0, "the fit went through the (fake) collectives"
    assert torch.equal(banks[0], single.memory_bank) and torch.equal(banks[1], single.memory_bank)


def test_an_empty_rank_still_takes_part(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _images_rows(4, 50, 16, seed=4)
    group = _FakeGroup(2)
    group.patch(monkeypatch)

    def rank_bank(rank: int) -> torch.Tensor:
        pool = PatchPool(16, 8, seed=1, store="disk")
        if rank == 1:
            for i, r in enumerate(rows):
                pool.add(r, f"{i}.png")
        return coreset_bank(pool, 0.1, progress=False)

    banks = group.run(rank_bank)
    expected = _expected(rows, 0.1, 8, seed=1)
    assert torch.equal(banks[0], expected) and torch.equal(banks[1], expected)
