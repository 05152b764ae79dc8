"""Run folders: ``<root>/<parts...>/v<N>/``, never overwriting an existing one; one per run on any number of processes.

Shared by ``adx.cli`` (one folder per ``adx fit|test|predict``) and ``adx.sweep`` (one folder per trial);
imports neither, so the two do not import each other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

RUN_DIR_ENV = "ADX_RUN_DIR"
"""Rank 0's run folder, inherited by the processes that Lightning's ddp launcher starts from it."""

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
"""Set by launchers (Lightning's ddp launcher, torchrun, SLURM) to a process's rank; 0 or absent on rank 0."""


class RunDirError(RuntimeError):
    """A process of a distributed run that cannot know which run folder rank 0 made."""


def new_run_dir(root: Path, *parts: str) -> Path:
    """Create and return ``root/parts.../v<N>`` with N one above the highest existing version."""
    base = root.joinpath(*[re.sub(r"[^\w.-]+", "_", p) for p in parts])
    base.mkdir(parents=True, exist_ok=True)
    n = (
        max([int(m.group(1)) for p in base.iterdir() if (m := re.fullmatch(r"v(\d+)", p.name))], default=-1)
        + 1
    )
    while True:
        try:
            (base / f"v{n}").mkdir()
            return base / f"v{n}"
        except FileExistsError:  # a concurrent run took it
            n += 1


def launched_as_worker() -> bool:
    """True in a process that a launcher started as a rank other than global rank 0 (from its environment)."""
    return any(os.environ.get(key, "0").strip() not in ("", "0") for key in RANK_VARIABLES)


def run_dir_for_this_process(root: Path, *parts: str) -> Path:
    """A new run folder (:func:`new_run_dir`) on rank 0; on the other ranks of a distributed run, the same one.

    Lightning's ``ddp`` launcher starts ranks 1.. by re-running the command line with ``LOCAL_RANK`` set,
    after rank 0 made its folder: rank 0 leaves the path in ``$ADX_RUN_DIR``, which they inherit. A worker
    without it (started by torchrun or SLURM, all at once) cannot know rank 0's folder and raises
    :class:`RunDirError`, which says to pass one folder to every process.
    """
    if launched_as_worker():
        shared = os.environ.get(RUN_DIR_ENV)
        if not shared:
            ranks = ", ".join(f"{k}={os.environ[k]}" for k in RANK_VARIABLES if k in os.environ)
            raise RunDirError(
                f"this process is a worker of a distributed run ({ranks}) started outside Lightning's ddp "
                f"launcher, so it cannot know rank 0's new run folder: pass --trainer.default_root_dir DIR (the "
                f"same for every process), or set {RUN_DIR_ENV}."
            )
        return Path(shared)
    path = new_run_dir(root, *parts)
    os.environ[RUN_DIR_ENV] = str(path)  # for the processes a ddp launcher starts from this one
    return path
