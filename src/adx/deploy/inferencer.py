"""The inspection-PC inferencer: decode images as adx does, run the bundle's graph, return per-image results."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adx.imageio import AdxDataError, BitDepth, check_bit_depth, decode_pil, read_image

OUTPUT_NAMES = ("image_score", "anomaly_map", "pred_score", "norm_map", "pred_label", "pred_mask")
RUNTIMES = ("onnxruntime", "openvino", "torch")
_DEFAULT_RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino", "torchscript": "torch"}


class BundleError(RuntimeError):
    """A bundle folder that cannot be used; the message names the file and what to do."""


@dataclass
class Result:
    """One image's outputs; maps are at the model's input size (``metadata["input_size"]``)."""

    path: str | None
    image_score: float  # raw score
    pred_score: float  # normalised: 0.5 = the image threshold (NaN when the bundle has no thresholds)
    pred_label: bool  # image_score >= image threshold
    anomaly_map: np.ndarray  # float32 (H, W) raw map
    norm_map: np.ndarray  # float32 (H, W), 0.5 = the pixel threshold
    pred_mask: np.ndarray  # bool (H, W)
    orig_size: tuple[int, int] = (0, 0)  # the image's own (H, W)
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The CSV row ``adx predict`` writes for this image."""
        return {
            "path": self.path,
            "image_score": self.image_score,
            "pred_score": self.pred_score,
            "pred_label": self.pred_label,
        }


def load_metadata(bundle: str | Path) -> dict[str, Any]:
    """``bundle/metadata.json`` as a dict; BundleError when the folder or file is missing or unreadable."""
    folder = Path(bundle)
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        raise BundleError(
            f"'{folder}' is not an adx bundle: it has no metadata.json. Write one with "
            "`adx export --ckpt <checkpoint> --format onnx|openvino|torchscript`."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read '{meta_path}': {exc}. Export the bundle again.") from exc
    graph = folder / str(meta.get("graph", ""))
    if not meta.get("graph") or not graph.is_file():
        raise BundleError(f"bundle '{folder}' names graph file '{meta.get('graph')}', which is missing")
    return meta


class Inferencer:
    """Runs an exported bundle: ``Inferencer("bundle").predict(["a.png", "b.png"])`` -> list of Result.

    ``runtime``: ``onnxruntime`` or ``openvino`` for an ONNX bundle (OpenVINO reads ONNX too), ``openvino``
    for an OpenVINO bundle, ``torch`` for TorchScript; by default the one that matches the bundle's format.
    Images are decoded by the rules adx trains with (:func:`adx.imageio.read_image`) at their own size and
    resized inside the graph, so the numbers are those of ``adx predict`` on the same files (the training
    data path rounds resized 8-bit images to 8 bits, a difference of at most half a grey level).
    """

    def __init__(
        self,
        bundle: str | Path,
        runtime: str | None = None,
        threads: int | None = None,
        batch_size: int = 8,
        bit_depth: BitDepth = "auto",
    ) -> None:
        self.bundle = Path(bundle)
        self.metadata = load_metadata(self.bundle)
        fmt = self.metadata.get("format")
        self.runtime = runtime or _DEFAULT_RUNTIME.get(str(fmt), "onnxruntime")
        if self.runtime not in RUNTIMES:
            raise BundleError(f"unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if (
            fmt == "torchscript"
            and self.runtime != "torch"
            or fmt != "torchscript"
            and self.runtime == "torch"
        ):
            raise BundleError(f"a {fmt} bundle cannot run on {self.runtime}; export --format to match")
        if fmt == "openvino" and self.runtime == "onnxruntime":
            raise BundleError("an openvino bundle runs on openvino only; use runtime='openvino'")
        self.batch_size = max(1, int(batch_size))
        self.bit_depth = check_bit_depth(bit_depth)
        self._run = self._load(self.bundle / self.metadata["graph"], threads)

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.metadata["input_size"]
        return int(h), int(w)

    @property
    def thresholds(self) -> dict[str, Any]:
        """Image/pixel thresholds, min/max, where they came from and the image counts behind them."""
        return dict(self.metadata.get("calibration", {}))

    def _load(self, graph: Path, threads: int | None) -> Any:
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None
        try:
            if self.runtime == "onnxruntime":
                import onnxruntime as ort

                options = ort.SessionOptions()
                if threads:
                    options.intra_op_num_threads = threads
                session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
                return lambda batch: session.run(list(OUTPUT_NAMES), {"image": batch})
            if self.runtime == "openvino":
                import openvino as ov

                config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # bf16 on some CPUs otherwise
                if threads:
                    config["INFERENCE_NUM_THREADS"] = threads
                compiled = ov.Core().compile_model(str(graph), "CPU", config)
                outputs = [compiled.output(name) for name in OUTPUT_NAMES]
                request = compiled.create_infer_request()

                def run(batch: np.ndarray) -> list[np.ndarray]:
                    got = request.infer({"image": batch})
                    return [np.array(got[o]) for o in outputs]

                return run
            import torch

            if threads:
                torch.set_num_threads(threads)
            module = torch.jit.load(str(graph), map_location="cpu").eval()

            def run_torch(batch: np.ndarray) -> list[np.ndarray]:
                with torch.no_grad():
                    return [t.numpy() for t in module(torch.from_numpy(batch))]

            return run_torch
        except ImportError as exc:
            raise BundleError(
                f'runtime {self.runtime} is not installed ({exc}); pip install "adx[deploy]" (onnxruntime, '
                "openvino) or choose another runtime"
            ) from exc

    # ---- running -------------------------------------------------------------------------------
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [B,3,H,W] in [0, 1] (any H x W) -> the graph's outputs by name."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected images as float32 [B,3,H,W], got shape {tuple(batch.shape)}")
        return dict(zip(OUTPUT_NAMES, self._run(batch), strict=True))

    def predict(self, images: Any) -> list[Result]:
        """Paths, PIL images or float arrays (H, W, 3) in [0, 1] (one or a list) -> one Result each."""
        items = list(images) if isinstance(images, list | tuple) else [images]
        arrays = [self._array(item) for item in items]
        results: list[Result | None] = [None] * len(items)
        # batch images of one size together, in order
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, arr in enumerate(arrays):
            by_size.setdefault(arr.shape, []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = np.stack([arrays[i].transpose(2, 0, 1) for i in chunk])
                out = self.run(batch)
                for j, i in enumerate(chunk):
                    results[i] = Result(
                        path=items[i] if isinstance(items[i], str | Path) else None,
                        image_score=float(out["image_score"][j]),
                        pred_score=float(out["pred_score"][j]),
                        pred_label=bool(out["pred_label"][j]),
                        anomaly_map=out["anomaly_map"][j],
                        norm_map=out["norm_map"][j],
                        pred_mask=out["pred_mask"][j].astype(bool),
                        orig_size=(int(arrays[i].shape[0]), int(arrays[i].shape[1])),
                    )
                    if results[i].path is not None:
                        results[i].path = str(items[i])
        return [r for r in results if r is not None]

    def predict_paths(self, paths: Iterable[str | Path]) -> Iterable[Result]:
        """Stream results over many files, ``batch_size`` images at a time (bounded memory)."""
        chunk: list[str] = []
        for path in paths:
            chunk.append(str(path))
            if len(chunk) == self.batch_size:
                yield from self.predict(chunk)
                chunk = []
        if chunk:
            yield from self.predict(chunk)

    def _array(self, item: Any) -> np.ndarray:
        if isinstance(item, str | Path):
            return read_image(str(item), self.bit_depth)
        if hasattr(item, "mode") and hasattr(item, "size"):  # a PIL image
            return decode_pil(item, self.bit_depth)
        arr = np.asarray(item, dtype=np.float32)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise AdxDataError(f"expected an image array (H, W, 3) in [0, 1], got shape {arr.shape}")
        return arr
