"""Export a fitted model's whole inference path (resize, model, calibration) as a deployable bundle.

A bundle is a folder holding one graph and ``metadata.json``:

- ``onnx``: ``model.onnx`` (opset 18, dynamo exporter), dynamic batch, height and width;
- ``openvino``: ``model.xml`` + ``model.bin``, converted from that ONNX graph (so both runtimes run one
  graph; exported from the same checkpoint after ``onnx`` in one process, the graph is reused, not traced
  again); ``fp16`` stores the weights in half precision (OpenVINO computes in float32 on CPU);
- ``torchscript``: ``model.pt`` from ``torch.jit.trace`` (height and width stay dynamic: the resize
  weights are computed from the input's shape).

A model fitted on tiles exports its tiling too (:class:`adx.tiling.Tiler`: static slices of the canvas,
the model on all tiles as one batch, the blended maps); ``metadata.json`` names the grid under ``tiling``.

The graph takes ``image`` float32 [B,3,H,W] in [0, 1] at any H x W (the raw image, decoded by the rules of
:mod:`adx.imageio`) and returns the outputs of :data:`adx.inference.OUTPUT_NAMES`. PatchCore carries its
memory bank and runs the pure-torch nearest-neighbour search (matrix product + top-k), never faiss.
``metadata.json`` says what the graph is: method, input size, thresholds and where they came from,
backbone and its weights hash, adx version, the checkpoint's hash, and the outputs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

import adx
from adx.callbacks.results import data_sources
from adx.inference import OUTPUT_NAMES, ExportModule
from adx.models.components.weights import sha256_file

Format = Literal["onnx", "openvino", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "openvino", "torchscript")
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt"}
BUNDLE_FORMAT = 1
OPSET = 18


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message says why and what to do."""


def metadata(model: Any, fmt: str, fp16: bool, ckpt_path: str | Path | None) -> dict[str, Any]:
    """What a bundle holds, JSON-ready (written as ``metadata.json``)."""
    backbone = getattr(model.model, "backbone", None)
    h, w = (int(v) for v in model.input_size)
    return {
        "bundle_format": BUNDLE_FORMAT,
        "format": fmt,
        "graph": GRAPH_FILES[fmt],
        "fp16": bool(fp16),
        "method": type(model).__name__,
        "hparams": {k: _plain(v) for k, v in dict(getattr(model, "hparams", {})).items()},
        "input": {
            "name": "image",
            "dtype": "float32",
            "layout": "[B,3,H,W], RGB in [0, 1], any H x W (resized inside to input_size)",
        },
        "input_size": [h, w],
        "tiling": _tiling(model),
        "outputs": list(OUTPUT_NAMES),
        "calibration": model.calibrator.state(),
        "backbone": {
            "name": getattr(backbone, "name", None),
            "weights": getattr(backbone, "weights_source", None),
            "weights_sha256": getattr(backbone, "weights_sha256", None),
        },
        # what a from-scratch model trained on besides the images (DRAEM's textures, DSR's VQ-VAE), or None
        "sources": _plain(data_sources(model)),
        "adx_version": adx.__version__,
        "checkpoint": None if ckpt_path is None else str(ckpt_path),
        "checkpoint_sha256": None if ckpt_path is None else sha256_file(ckpt_path),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _tiling(model: Any) -> dict[str, Any] | None:
    """The tile grid inside the graph (input_size is then the canvas), or None when the model is not tiled."""
    grid = getattr(model, "tile_grid", None)
    if grid is None:
        return None
    return {
        **grid.facts(),
        "image_score": "largest tile score",
        "maps": "tile maps blended by linear ramps over the overlaps, normalised by the summed weights",
    }


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a hyperparameter value."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def _check_exportable(model: Any) -> None:
    model.check_fitted()
    h, w = (int(v) for v in model.input_size)
    if h <= 0 or w <= 0:
        raise ExportError(
            f"{type(model).__name__} has no input size: it was never fitted through adx (the size is set when "
            "training starts). Export a checkpoint written by `adx fit`."
        )
    if not model.calibrated:
        warnings.warn(
            "the model has no thresholds (it was fitted without validation images): the bundle's labels are "
            "all False and its normalised scores NaN. Fit with --data.val_source test_split or train_split.",
            stacklevel=3,
        )


def _example(model: Any) -> torch.Tensor:
    h, w = (int(v) for v in model.input_size)
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))


def _onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch, height, width = (torch.export.Dim(n, min=1, max=1 << 15) for n in ("batch", "height", "width"))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=["image"],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"image": {0: batch, 2: height, 3: width}},
            verbose=False,
        )
    program.save(str(path), external_data=False)


_LAST_ONNX: dict[str, bytes] = {}
"""The ONNX graph this process exported last, under :func:`_graph_key` (one entry). The dynamo exporter takes
tens of seconds even for a small model on a CPU; exporting one checkpoint to ONNX and then to OpenVINO (which
converts that same graph) traces it once."""


def _graph_key(module: torch.nn.Module, example: torch.Tensor, ckpt_path: str | Path | None) -> str | None:
    """What determines the exported graph: the checkpoint file, the module's tensors, the example's shape, the
    opset and torch's version; None (no reuse) for a model that does not come from a checkpoint file."""
    if ckpt_path is None:
        return None
    digest = hashlib.sha256()
    for part in (sha256_file(ckpt_path), str(tuple(example.shape)), str(OPSET), torch.__version__):
        digest.update(part.encode())
    for name, value in module.state_dict().items():  # tensors, and extra states (plain values)
        if not isinstance(value, torch.Tensor):
            digest.update(f"{name}={value!r}".encode())
            continue
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _onnx_once(module: torch.nn.Module, example: torch.Tensor, path: Path, key: str | None) -> None:
    """:func:`_onnx`, or the bytes of the graph exported last when ``key`` is the same."""
    if key is not None and key in _LAST_ONNX:
        path.write_bytes(_LAST_ONNX[key])
        return
    _onnx(module, example, path)
    if key is not None:
        _LAST_ONNX.clear()
        _LAST_ONNX[key] = path.read_bytes()


def export(
    model: Any,
    out: str | Path,
    fmt: Format = "onnx",
    fp16: bool = False,
    ckpt_path: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s inference module to the bundle folder ``out``; return ``out``.

    ``model`` is a fitted :class:`adx.models.base.AnomalyModule`. An existing non-empty ``out`` is refused
    unless ``overwrite`` (results are never replaced silently).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fp16 and fmt != "openvino":
        raise ExportError(
            f"--fp16 is supported for openvino only (weights stored in half precision); {fmt} exports float32. "
            "Drop --fp16 or use --format openvino."
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(
                f"bundle folder '{out}' exists and is not empty; pass --overwrite or choose --out"
            )
        shutil.rmtree(out)
    _check_exportable(model)
    model = model.cpu().eval()
    module = ExportModule(model.inference_module()).eval()
    example = _example(model)
    out.mkdir(parents=True, exist_ok=True)
    graph = out / GRAPH_FILES[fmt]
    key = _graph_key(module, example, ckpt_path) if fmt in ("onnx", "openvino") else None
    if fmt == "onnx":
        _onnx_once(module, example, graph, key)
    elif fmt == "openvino":
        import openvino as ov

        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            _onnx_once(module, example, onnx_path, key)
            ov.save_model(ov.convert_model(str(onnx_path)), str(graph), compress_to_fp16=fp16)
    else:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example, check_trace=False, strict=False)
        traced.save(str(graph))
    meta = metadata(model, fmt, fp16, ckpt_path)
    (out / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out
