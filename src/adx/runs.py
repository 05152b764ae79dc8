"""Run folders: ``<root>/<parts...>/v<N>/``, never overwriting an existing one.

Shared by ``adx.cli`` (one folder per ``adx fit|test|predict``) and ``adx.sweep`` (one folder per trial);
imports neither, so the two do not import each other.
"""

from __future__ import annotations

import re
from pathlib import Path


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
