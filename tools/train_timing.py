"""Training-epoch timing shared by tools/bench_train.py (adx) and tools/peer_train.py (the peer's venv).

Imports only lightning, which both environments have, so both sides are timed by the same code.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

# The run settings both sides take, with their defaults; bench_train.py forwards them to peer_train.py.
RUN_OPTIONS: dict[str, tuple[type, Any]] = {
    "backbone": (str, "resnet18"),
    "image-size": (int, 256),
    "batch-size": (int, 16),
    "batches": (int, 8),
    "epochs": (int, 3),
}


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--backbone --image-size --batch-size --batches --epochs`` to ``parser``."""
    for name, (kind, default) in RUN_OPTIONS.items():
        parser.add_argument(f"--{name}", type=kind, default=default)


def run_options_argv(args: argparse.Namespace) -> list[str]:
    """The parsed run settings as command-line arguments (to pass them on)."""
    return [a for name in RUN_OPTIONS for a in (f"--{name}", str(getattr(args, name.replace("-", "_"))))]


def peak_rss_mb() -> int:
    """This process's peak resident memory in MB.

    Read from /proc (VmHWM, reset by exec) where there is one: getrusage's ru_maxrss survives exec, so a
    peer started from the benchmark process would report at least the benchmark's own peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


class EpochTimer(Callback):
    """Seconds from each training epoch's start to the end of its last training batch.

    Data loading is included, validation is not.
    """

    def __init__(self, out: str | None = None) -> None:
        """``out``: a JSON file the record is written to when fit ends (for runs through ``adx fit``)."""
        self.seconds: list[float] = []
        self.images = 0
        self.t0 = 0.0
        self.out = out

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.t0, self.images = time.perf_counter(), 0

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.images += len(batch["image"] if isinstance(batch, dict) else batch.image)
        if batch_idx == trainer.num_training_batches - 1:
            self.seconds.append(time.perf_counter() - self.t0)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.out and self.seconds:
            Path(self.out).write_text(json.dumps(self.record(), indent=1))

    def record(self, **facts: Any) -> dict[str, Any]:
        """Facts plus per-epoch seconds, images/s (median over epochs after the warm-up one), peak RSS."""
        steady = sorted(self.seconds[1:] or self.seconds)
        median = steady[len(steady) // 2]
        return {
            **facts,
            "images_per_epoch": self.images,
            "epoch_seconds": [round(s, 2) for s in self.seconds],
            "train_img_per_s": round(self.images / median, 2),
            "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(),
        }
