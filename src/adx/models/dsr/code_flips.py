"""Where DSR's ONNX graph picks other codebook vectors than torch (a deployment check; needs onnx, onnxruntime).

DSR's inference runs four nearest-vector searches (Q_lo, Q_hi and the two re-quantisations). A search is
discontinuous: where a feature is almost equidistant from two different vectors, the rounding differences
of another runtime (its resize, its convolutions) can make it pick the other one, and the decoders spread
that change over a patch of the map. :func:`code_flips` exposes the ArgMin outputs of the exported graph,
runs it in ONNX Runtime next to torch and reports, per search, the indices that differ and torch's gap
between the nearest and second-nearest distance there, relative to the distances' scale (|e|^2 + 2|z||e|
of the nearest vector e): a gap near float32 rounding (1e-7) is such a near-tie.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adx.models.dsr import vq


def code_flips(
    model: Any, batches: list[Tensor], graph_file: str | Path | None = None
) -> list[dict[str, Any]]:
    """For each image batch [B,3,H,W] in [0,1]: the largest score and map differences between ONNX Runtime
    and torch, and per search (in graph order) how many indices differ and the relative gaps there.

    ``model`` is a fitted :class:`adx.models.DSR`; ``graph_file`` the ``model.onnx`` that ``adx export``
    wrote for it (None: it is exported here the same way).
    """
    import onnx
    import onnxruntime as ort

    from adx.export import ExportModule, export

    if graph_file is not None:
        graph = onnx.load(str(graph_file))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            export(model, Path(tmp) / "onnx", "onnx")
            graph = onnx.load(str(Path(tmp) / "onnx" / "model.onnx"))
    searches = [node for node in graph.graph.node if node.op_type == "ArgMin"]
    for node in searches:
        graph.graph.output.append(
            onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.INT64, None)
        )
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])

    recorded: list[tuple[Tensor, Tensor]] = []
    nearest = vq.Codebook.indices

    def recording(book: vq.Codebook, z: Tensor) -> Tensor:
        index = nearest(book, z)
        recorded.append((index, book.relative_gaps(z)))
        return index

    module = ExportModule(model.cpu().eval().inference_module()).eval()
    reports = []
    vq.Codebook.indices = recording  # type: ignore[method-assign]
    try:
        for batch in batches:
            x = batch.float().contiguous()
            recorded.clear()
            with torch.no_grad():
                ref = module(x)
            got = session.run(None, {"image": x.numpy()})
            first = len(got) - len(searches)
            if len(recorded) != len(searches):
                raise RuntimeError(
                    f"torch ran {len(recorded)} searches, the graph has {len(searches)} ArgMin nodes"
                )
            report: dict[str, Any] = {
                "size": [int(x.shape[-2]), int(x.shape[-1])],
                "score_max_diff": float(np.abs(got[0] - ref[0].numpy()).max()),
                "map_max_diff": float(np.abs(got[1] - ref[1].numpy()).max()),
                "searches": [],
            }
            for i, (index, gap) in enumerate(recorded):
                flipped = got[first + i] != index.numpy()
                report["searches"].append(
                    {
                        "positions": int(index.numel()),
                        "flipped": int(flipped.sum()),
                        "relative_gaps_at_flips": [float(g) for g in gap.numpy()[flipped]],
                        "smallest_relative_gap": float(gap.min()),
                    }
                )
            reports.append(report)
    finally:
        vq.Codebook.indices = nearest  # type: ignore[method-assign]
    return reports


def unexplained(
    reports: list[dict[str, Any]], near_tie: float = 1e-5, map_tolerance: float = 1e-4
) -> list[str]:
    """What in :func:`code_flips`' reports is not a near-tie flip or its consequence ([] when all is).

    A flip is explained when its relative gap is below ``near_tie`` or an earlier search already flipped
    (the later searches read what the earlier ones chose); a map difference above ``map_tolerance`` is
    explained only by some flip.
    """
    problems = []
    for report in reports:
        upstream = False
        for i, search in enumerate(report["searches"]):
            wide = [g for g in search["relative_gaps_at_flips"] if g >= near_tie]
            if wide and not upstream:
                problems.append(
                    f"{report['size']}: search {i} flipped at relative gaps {wide[:3]} (not near-ties)"
                )
            upstream |= search["flipped"] > 0
        if not upstream and report["map_max_diff"] > map_tolerance:
            problems.append(
                f"{report['size']}: map differs by {report['map_max_diff']:.2e} with no code flipped"
            )
    return problems
