"""Seeds: stable per-image seeds for synthetic anomalies (DRAEM, DSR), for reproducible runs, resumes and DDP
ranks; weights built from a seed of their own."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePath
from typing import Any

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the block torch's CPU generator starts from ``seed``; after it, the global generator is as it
    was (a model's initial weights depend on its ``seed`` argument alone, not on what ran before)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def mix(*keys: Any) -> int:
    """A stable 63-bit seed from ints and strings (the same on every machine and Python process)."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


PATH_PARTS = 3
"""How many trailing parts of an image's path key its evaluation anomalies (``train/good/000.png`` in the
MVTec layout): where the dataset lies on disk does not change them."""


def path_key(path: Any) -> str:
    """The last ``PATH_PARTS`` parts of ``path``, joined by "/" (the same for a dataset moved or copied)."""
    return "/".join(PurePath(str(path)).parts[-PATH_PARTS:])


def batch_seeds(batch: dict[str, Any], train_key: tuple, eval_key: tuple) -> list[int]:
    """One generator seed per image of ``batch``.

    Training batches carry ``anomaly_step`` (the optimizer step) and ``anomaly_rank``: a fresh draw per step,
    rank and image, ``mix(*train_key, step, rank, index)``. Other batches (the validation loss, reference
    passes) are seeded by each image's place in its dataset, ``mix(*eval_key, path_key(path))``, so every
    epoch scores the same anomalies, and a dataset moved to another folder or machine gets the same ones
    (an absolute path made them, and the statistics computed from them, depend on the folder).
    """
    n = len(batch["image"])
    step = batch.get("anomaly_step")
    if step is not None:
        rank = int(batch.get("anomaly_rank", 0))
        return [mix(*train_key, int(step), rank, i) for i in range(n)]
    paths = batch.get("path")
    keys: list[Any] = [path_key(p) for p in paths] if isinstance(paths, list | tuple) else []
    if len(keys) != n:
        keys = list(range(n))
    return [mix(*eval_key, k) for k in keys]
