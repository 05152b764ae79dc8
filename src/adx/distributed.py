"""Several processes: collectives that are the identity alone, and shards without repeats.

Collectives (``gather_rows``, ``all_reduce_sum``, ...) return their input unchanged without a process
group of more than one process, so single-process code calls them unconditionally. Every rank must
make the same sequence of collective calls: call them once per epoch or stage, never once per batch
(ranks may hold different numbers of batches). See docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device(x: Tensor) -> torch.device:
    """gloo reduces CPU tensors, nccl CUDA tensors."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` [N_r, ...] along dim 0, in rank order (N_r may differ); identity alone."""
    if not is_distributed():
        return x
    device = _comm_device(x)
    n = torch.tensor([x.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(x.device)


def gather_list(items: list[Any]) -> list[Any]:
    """Concatenate every rank's list (of picklable items, e.g. paths) in rank order; ``items`` alone."""
    if not is_distributed():
        return items
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks (a new tensor); ``x`` itself alone."""
    if not is_distributed():
        return x
    out = x.detach().to(_comm_device(x)).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(x.device)


def all_reduce_max(x: Tensor) -> Tensor:
    """Element-wise maximum of ``x`` over ranks; ``x`` itself alone."""
    if not is_distributed():
        return x
    out = x.detach().to(_comm_device(x)).clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(x.device)


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (any picklable object); ``obj`` itself alone."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_table(columns: dict[str, Any]) -> dict[str, Any]:
    """Every rank's row-aligned columns (tensors [N_r, ...] or lists), concatenated in rank order.

    A rank may lack a column or hold no rows; the column's kind, trailing shape and dtype then come from
    the ranks that have it. ``columns`` itself alone.
    """
    if not is_distributed():
        return columns
    specs: dict[str, tuple[Any, ...]] = {}
    for part in gather_list([_column_specs(columns)]):
        specs.update(part)
    out: dict[str, Any] = {}
    for key in sorted(specs):  # the same order, hence the same collectives, on every rank
        kind, shape, dtype = specs[key]
        if kind == "tensor":
            out[key] = gather_rows(columns.get(key, torch.empty((0, *shape), dtype=dtype)))
        else:
            out[key] = gather_list(list(columns.get(key, [])))
    return out


def _column_specs(columns: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    return {
        key: ("tensor", tuple(v.shape[1:]), v.dtype) if isinstance(v, Tensor) else ("list", None, None)
        for key, v in columns.items()
    }


def rank_zero_result(fn: Callable[[], T]) -> T:
    """``fn()`` computed on rank 0 only and returned on every rank; if it raises, every rank raises."""
    if not is_distributed():
        return fn()
    result: Any = None
    error: BaseException | None = None
    if rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, once the other ranks know
            error = exc
    # the error travels as text: any exception pickles that way, and no rank is left waiting
    ok, value = broadcast_object(
        (error is None, result if error is None else f"{type(error).__name__}: {error}")
    )
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def barrier() -> None:
    """Wait until every rank arrives here; nothing alone."""
    if is_distributed():
        dist.barrier()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (what DDP does at wrap time)."""
    if not is_distributed():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.numel() == 0:
            continue
        data = tensor.data.to(_comm_device(tensor))
        dist.broadcast(data, src=src)
        if data.data_ptr() != tensor.data.data_ptr():
            tensor.data.copy_(data)


# ---- running a one-pass fit under Lightning's DDP strategies ------------------------------------------


def fit_without_ddp_wrapper(trainer: Any) -> bool:
    """Let a DDP strategy fit a module with nothing to train without wrapping it in DistributedDataParallel.

    PyTorch refuses to wrap a module without trainable parameters, and the wrapper's forward passes sync
    buffers across ranks (collectives per batch, which ranks holding different numbers of batches cannot
    match). One-pass methods reduce their statistics once, in ``fit()``, instead. Call from ``setup("fit")``, before
    the strategy wraps the model; the strategy then only copies rank 0's weights to every rank. Returns
    True when the strategy was changed.
    """
    from lightning.pytorch.strategies import DDPStrategy

    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DDPStrategy):
        return False

    def configure_ddp() -> None:  # shadows DDPStrategy.configure_ddp for this strategy object only
        broadcast_module(strategy.model)

    strategy.configure_ddp = configure_ddp
    return True


# ---- shards without repeats -------------------------------------------------------------------------------


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous slice of ``n`` items (sizes differ by at most 1)."""
    q, extra = divmod(n, world)
    start = rank * q + min(rank, extra)
    return start, start + q + (rank < extra)


def even_batch_size(n: int, world: int, batch_size: int) -> int:
    """A batch size that gives every rank's slice of ``n`` items the same number of batches.

    The largest one up to ``batch_size`` that does; if none does (batch size 1 with uneven slices), the
    smallest above it. Equal batch counts keep ranks in step where something makes a collective per
    batch (DDP's buffer sync, ``self.log(..., sync_dist=True)`` per step).
    """
    big, small = -(-n // world), n // world
    if small < 1:
        raise ValueError(f"{n} items cannot be split over {world} processes: each needs at least one")
    fits = [b for b in range(1, big + 1) if -(-big // b) == -(-small // b)]
    below = [b for b in fits if b <= batch_size]
    return max(below) if below else min(fits)


class ShardSampler(DistributedSampler):
    """Indices of this rank's contiguous slice of the dataset, in order: disjoint, without the padding repeats.

    Gathering per-rank outputs in rank order gives the dataset order back, as in one process. A
    ``DistributedSampler`` subclass, so Lightning keeps it instead of injecting its own.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)  # type: ignore[arg-type]
        self.start, self.stop = shard_bounds(len(dataset), num_replicas, rank)
        self.num_samples, self.total_size = self.stop - self.start, len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.num_samples
