"""Frozen-feature cache: a frozen backbone's outputs per training image, computed once, read every epoch.

When the backbone is frozen and training images are not augmented, every epoch after the first would
recompute identical features. The cache keys them by image path and keeps them in memory while the
estimated total fits ``memory_budget`` bytes, otherwise in per-image files in a temporary folder that
is removed when the cache is closed. Values are stored exactly (same dtype), so training is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

CacheMode = Literal["auto", "memory", "disk", "off"]
DEFAULT_BUDGET = 4 << 30  # bytes kept in memory by "auto" before it spills to disk


def _bytes(feats: Sequence[Tensor]) -> int:
    return sum(f.numel() * f.element_size() for f in feats)


class FeatureCache:
    """Per-image lists of feature tensors [C,h,w], keyed by path; ``get`` returns batched tensors or None."""

    def __init__(
        self,
        mode: CacheMode = "auto",
        expected_images: int = 0,
        memory_budget: int = DEFAULT_BUDGET,
        folder: str | Path | None = None,
    ) -> None:
        if mode not in ("auto", "memory", "disk", "off"):
            raise ValueError(f"feature_cache must be auto, memory, disk or off, got {mode!r}")
        self.mode, self.expected, self.budget = mode, int(expected_images), int(memory_budget)
        self.parent = folder
        self.folder: Path | None = None
        self.store: dict[str, list[Tensor]] = {}
        self.on_disk: set[str] = set()
        self.hits = self.misses = 0

    @property
    def where(self) -> str:
        """``memory`` or ``disk`` once decided, ``undecided`` before the first put."""
        if self.mode in ("memory", "disk"):
            return self.mode
        return "disk" if self.folder is not None else ("memory" if self.store else "undecided")

    def get(self, paths: Sequence[str], device: torch.device) -> list[Tensor] | None:
        """Stacked features (one [B,C,h,w] per map) when every path is cached, else None."""
        if not paths or any(p not in self.store and p not in self.on_disk for p in paths):
            self.misses += 1
            return None
        self.hits += 1
        rows = [self.store[p] if p in self.store else self._read(p) for p in paths]
        return [torch.stack([r[i] for r in rows]).to(device, non_blocking=True) for i in range(len(rows[0]))]

    def put(self, paths: Sequence[str], feats: Sequence[Tensor]) -> None:
        """Cache the batch's features (one [B,C,h,w] per map) under the images' paths."""
        rows = [[f[i].detach().cpu().clone() for f in feats] for i in range(len(paths))]
        if self.mode == "disk" or (self.mode == "auto" and self._spill(rows[0])):
            for path, row in zip(paths, rows, strict=True):
                self._write(path, row)
        else:
            for path, row in zip(paths, rows, strict=True):
                self.store[path] = row

    def _spill(self, row: list[Tensor]) -> bool:
        """auto: go to disk when the expected total exceeds the memory budget (decided once)."""
        if self.folder is None and not self.store:
            if _bytes(row) * max(self.expected, 1) > self.budget:
                self._open_folder()
        return self.folder is not None

    def _open_folder(self) -> Path:
        if self.folder is None:
            parent = self.parent or os.environ.get("ADX_CACHE_DIR") or None
            if parent:
                Path(parent).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="adx_features_", dir=parent))
        return self.folder

    def _file(self, path: str) -> Path:
        return self._open_folder() / (hashlib.sha1(path.encode()).hexdigest() + ".pt")

    def _write(self, path: str, row: list[Tensor]) -> None:
        torch.save(row, self._file(path))
        self.on_disk.add(path)

    def _read(self, path: str) -> list[Tensor]:
        return torch.load(self._file(path), weights_only=True)

    def close(self) -> None:
        """Forget everything and delete the disk folder."""
        self.store.clear()
        self.on_disk.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
