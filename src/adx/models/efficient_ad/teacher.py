"""EfficientAD's teacher: a PDN distilled from a pretrained adx feature extractor on offline natural images.

The paper distils a WideResNet-101 (PatchCore's layer 2 + 3 features) into the PDN on ImageNet. Here the
target is any adx extractor (``components/extractor.py``): its maps of a crop enlarged ``scale`` times (so
that a stride-8 map lands on the PDN's stride-4 grid), each smoothed over 3 x 3 positions (PatchCore's local
aggregation), resized to the PDN's output grid, concatenated, projected to 384 channels by a fixed seeded
Gaussian matrix and normalised per channel (mean / std measured on the first batches of crops). The crops
come from :class:`~adx.models.components.sources.NaturalImages`. A distilled teacher is cached once per machine
under ``$ADX_CACHE_DIR/efficientad`` (``~/.cache/adx/efficientad``), keyed by everything it depends on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adx
from adx.models.components.extractor import Backbone
from adx.models.components.sources import NaturalImages
from adx.models.components.weights import read_state_file, sha256_file

FORMAT = 1
"""Layout version of adx's teacher files (``{"format", "state_dict", "provenance"}``)."""
CACHE_ENV = "ADX_CACHE_DIR"
NORM_BATCHES = 4  # batches of crops the target's per-channel mean / std are measured on


class TeacherWeightsError(ValueError):
    """A teacher weights file that does not exist, cannot be read or does not fit the PDN."""


def cache_root(folder: str | None = None) -> Path:
    """Where distilled teachers are cached: ``folder``, else ``$ADX_CACHE_DIR/efficientad``, else
    ``~/.cache/adx/efficientad``."""
    if folder:
        return Path(folder).expanduser()
    base = os.environ.get(CACHE_ENV)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "adx") / "efficientad"


def build_extractor(
    backbone: str,
    strides: Sequence[int],
    blocks: Sequence[int] | str | None,
    weights: str | None,
    pretrained: bool,
    normalization: str,
    optimize: bool = True,
) -> Backbone:
    """The frozen feature extractor whose maps the teacher learns (a CNN by strides, a ViT by blocks)."""
    kwargs: dict[str, Any] = {"normalization": normalization}
    if blocks is not None:
        kwargs["blocks"] = blocks
    with warnings.catch_warnings():
        if not pretrained:
            warnings.filterwarnings("ignore", message="backbone .* uses RANDOM weights")
        return Backbone(backbone, tuple(strides), weights, pretrained, optimize, **kwargs)


class DistillationTarget(nn.Module):
    """Crops [B,3,h,w] in [0,1] -> target maps [B,channels,*grid] for the PDN to learn (frozen)."""

    def __init__(self, extractor: Backbone, channels: int = 384, scale: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        self.extractor, self.scale = extractor, float(scale)
        inputs = int(sum(extractor.channels))
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("projection", torch.randn(channels, inputs, generator=gen) / math.sqrt(inputs))
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))
        multiple = extractor.patch_size[0] if extractor.patch_size is not None else max(extractor.strides)
        self.multiple = int(multiple)

    def raw(self, crops: Tensor, grid: tuple[int, int]) -> Tensor:
        """Projected, un-normalised target maps [B,channels,*grid] of crops [B,3,h,w] in [0,1]."""
        h, w = crops.shape[-2:]
        size = [max(1, round(s * self.scale / self.multiple)) * self.multiple for s in (h, w)]
        x = F.interpolate(crops, size=size, mode="bilinear", align_corners=False)
        maps = []
        for f in self.extractor(x):
            f = F.avg_pool2d(f.float(), 3, stride=1, padding=1, count_include_pad=False)
            maps.append(F.interpolate(f, size=grid, mode="bilinear", align_corners=False))
        return torch.einsum("oc,bchw->bohw", self.projection, torch.cat(maps, dim=1))

    @torch.no_grad()
    def fit_normalisation(self, batches: Sequence[Tensor], grid: Callable[[Tensor], tuple[int, int]]) -> None:
        """Per-channel mean / std of the projected maps over ``batches`` of crops."""
        total = torch.zeros(self.mean.shape[1], dtype=torch.float64, device=self.mean.device)
        squares, count = torch.zeros_like(total), 0
        for crops in batches:
            y = self.raw(crops, grid(crops)).double()
            total += y.sum(dim=(0, 2, 3))
            squares += y.square().sum(dim=(0, 2, 3))
            count += y.shape[0] * y.shape[2] * y.shape[3]
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
        self.mean.copy_(mean.view(1, -1, 1, 1).float())
        self.std.copy_(std.view(1, -1, 1, 1).float())

    def forward(self, crops: Tensor, grid: tuple[int, int]) -> Tensor:
        """Normalised target maps [B,channels,*grid]."""
        return (self.raw(crops, grid) - self.mean) / self.std


def distill(
    pdn: nn.Module,
    prepare: Callable[[Tensor], Tensor],
    target: DistillationTarget,
    images: NaturalImages,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    log: Callable[[str], None],
) -> list[float]:
    """Train ``pdn`` (its input through ``prepare``) for ``steps`` Adam steps on the MSE to ``target``'s maps."""
    loader = torch.utils.data.DataLoader(
        images, batch_size=batch_size, generator=torch.Generator().manual_seed(seed)
    )
    stream = _endless(loader, device)
    target.to(device).eval()
    pdn.to(device).train()
    pdn.requires_grad_(True)

    def grid(crops: Tensor) -> tuple[int, int]:
        with torch.no_grad():
            return tuple(pdn(prepare(crops[:1])).shape[-2:])  # type: ignore[return-value]

    first = [next(stream) for _ in range(min(NORM_BATCHES, steps))]
    target.fit_normalisation(first, grid)
    size = grid(first[0])
    optimizer = torch.optim.Adam(pdn.parameters(), lr=lr, weight_decay=1e-5)
    losses: list[float] = []
    every = max(1, steps // 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            crops = first[step] if step < len(first) else next(stream)
            with torch.no_grad():
                goal = target(crops, size)
            loss = F.mse_loss(pdn(prepare(crops)).float(), goal)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if (step + 1) % every == 0 or step + 1 == steps:
                log(f"adx: EfficientAD teacher distillation step {step + 1}/{steps}, loss {losses[-1]:.4f}")
    pdn.eval()
    pdn.requires_grad_(False)
    return losses


def _endless(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[Tensor]:
    while True:
        for crops in loader:
            yield crops.to(device)


def key_of(settings: dict[str, Any]) -> str:
    """SHA-256 of the settings (sorted JSON): the cache key."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def save_teacher(pdn: nn.Module, path: Path, provenance: dict[str, Any]) -> None:
    """Write the teacher's state dict and provenance atomically (tmp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(pdn)}.tmp")
    state = {k: v.detach().cpu().clone() for k, v in pdn.state_dict().items()}
    torch.save({"format": FORMAT, "state_dict": state, "provenance": provenance}, tmp)
    tmp.replace(path)


def load_teacher(pdn: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a teacher file (adx's, or a plain PDN state dict) into ``pdn``; return the provenance saved with it."""
    fix = "fix --model.teacher_weights"
    obj, provenance = read_state_file(path, TeacherWeightsError, fix)
    own = pdn.state_dict()
    wrong = [k for k in own if k in obj and tuple(obj[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in obj]
    extra = [k for k in obj if k not in own]
    if wrong or missing or extra:
        parts = [f"{k} {tuple(obj[k].shape)} in the file, {tuple(own[k].shape)} here" for k in wrong[:3]]
        parts += [f"missing {missing[:4]}"] if missing else []
        parts += [f"not in this PDN {extra[:4]}"] if extra else []
        raise TeacherWeightsError(
            f"teacher weights {path} do not fit the configured PDN ({'; '.join(parts)}). The file must be the "
            f"state dict of the PDN (keys {list(own)[:2]}...): check --model.model_size, or {fix}"
        )
    pdn.load_state_dict({k: v.float() for k, v in obj.items()})
    return provenance


def file_record(path: str | Path, saved: dict[str, Any]) -> dict[str, Any]:
    """Provenance of a teacher read from a user's file."""
    resolved = Path(path).expanduser().resolve()
    return {"kind": "file", "file": str(resolved), "sha256": sha256_file(resolved), "saved": saved or None}


def distilled_record(
    settings: dict[str, Any], key: str, losses: list[float], seconds: float, device: torch.device
) -> dict[str, Any]:
    """Provenance of a teacher distilled here."""
    tail = losses[-10:]
    return {
        "kind": "distilled",
        **settings,
        "key": key,
        "first_loss": losses[0] if losses else None,
        "final_loss": float(sum(tail) / max(1, len(tail))),
        "seconds": round(seconds, 1),
        "torch": str(torch.__version__),
        "adx": adx.__version__,
        "device": str(device),
    }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
