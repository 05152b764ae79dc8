"""Collective helpers that are the identity in a single process (no torch.distributed group)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


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
