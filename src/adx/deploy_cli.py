"""``adx export`` and ``adx predict --bundle``: the deploy commands (plain argparse, no Trainer).

adx export --ckpt RUN/checkpoints/last.ckpt --format onnx          # -> RUN/export/onnx/
adx predict --bundle RUN/export/onnx --data.path /images/new_batch  # -> predictions.csv + heatmaps
"""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path
from typing import Any

from adx.export import FORMATS, ExportError, export


def load_model(ckpt: str | Path) -> Any:
    """The fitted adx model in a checkpoint, without loading pretrained weights again (they are in it)."""
    from adx.cli import load_checkpoint
    from adx.models import MODELS
    from adx.models.base import CheckpointError, check_checkpoint
    from adx.models.components.weights import restoring_weights

    path = Path(ckpt)
    if not path.is_file():
        raise SystemExit(f"adx: checkpoint {path} does not exist.")
    try:
        state = load_checkpoint(path)
        check_checkpoint(state, source=f"checkpoint {path}")
    except CheckpointError as exc:
        raise SystemExit(f"adx: {exc}") from None
    except Exception as exc:
        raise SystemExit(f"adx: cannot read checkpoint {path} ({type(exc).__name__}: {exc}).") from exc
    name = state.get("adx_model")
    if name not in MODELS:
        raise SystemExit(
            f"adx: checkpoint {path} holds model {name!r}, not one of {', '.join(sorted(MODELS))}."
        )
    with restoring_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MODELS[name].load_from_checkpoint(path, map_location="cpu", weights_only=True)


def export_main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(
        prog="adx export",
        description="Write a fitted model's whole inference path (resize, model, thresholds) as a bundle.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint written by adx fit")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--out", default=None, help="bundle folder (default: <run>/export/<format>)")
    parser.add_argument("--fp16", action="store_true", help="half-precision weights (openvino)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    args = parser.parse_args(argv)
    ckpt = Path(args.ckpt)
    model = load_model(ckpt)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out = Path(args.out) if args.out else run / "export" / (args.format + ("_fp16" if args.fp16 else ""))
    try:
        bundle = export(model, out, args.format, fp16=args.fp16, ckpt_path=ckpt, overwrite=args.overwrite)
    except ExportError as exc:
        raise SystemExit(f"adx: {exc}") from None
    print(f"adx: bundle in {bundle}")
    return bundle


def predict_bundle_main(argv: list[str]) -> Path:
    """``adx predict --bundle DIR --data.path PATH``: rows and heatmap panels streamed to a new folder."""
    from adx.callbacks.results import ROW_KEYS, exclusive_path
    from adx.data.datamodule import list_predict_path
    from adx.deploy import BundleError, Inferencer
    from adx.runs import new_run_dir
    from adx.visualize import panel, save_image

    parser = argparse.ArgumentParser(prog="adx predict --bundle", description=predict_bundle_main.__doc__)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data.path", dest="path", required=True, help="an image file or a folder of images")
    parser.add_argument(
        "--runtime", default=None, help="onnxruntime | openvino | torch (default: the bundle's)"
    )
    parser.add_argument("--out", default=None, help="results folder (default: <bundle>/predict/v<N>)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--heatmaps", default="true", choices=["true", "false"])
    args = parser.parse_args(argv)
    try:
        inferencer = Inferencer(args.bundle, runtime=args.runtime, batch_size=args.batch_size)
    except BundleError as exc:
        raise SystemExit(f"adx: {exc}") from None
    samples = list_predict_path(args.path)
    out = Path(args.out) if args.out else new_run_dir(Path(args.bundle), "predict")
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k in ROW_KEYS if k in ("path", "image_score", "pred_score", "pred_label")]
    with open(exclusive_path(out, "predictions.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        for result in inferencer.predict_paths(s.image_path for s in samples):
            row = result.row()
            writer.writerow([f"{row[k]:.6g}" if isinstance(row[k], float) else row[k] for k in keys])
            fh.flush()
            if args.heatmaps == "true":
                image = _display(result.path, inferencer.input_size)
                tile = panel(image, result.norm_map, result.pred_mask, None)
                folder = out / "heatmaps"
                folder.mkdir(exist_ok=True)
                save_image(exclusive_path(folder, Path(str(result.path)).stem + ".jpg"), tile)
    print(f"adx: {len(samples)} prediction(s) in {out}")
    return out


def _display(path: str | None, size: tuple[int, int]) -> Any:
    """The image as uint8 (H, W, 3) at the model's input size (the panel shows what the model saw)."""
    import numpy as np
    import torch

    from adx.data.dataset import resize_pixels
    from adx.imageio import read_image

    pixels = torch.from_numpy(read_image(str(path))).permute(2, 0, 1)
    return (
        (resize_pixels(pixels, size).clamp(0, 1) * 255)
        .round()
        .byte()
        .permute(1, 2, 0)
        .numpy()
        .astype(np.uint8)
    )
