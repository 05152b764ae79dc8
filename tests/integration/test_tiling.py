"""Tiling through the CLI: fit on tiles, test and export with the tiles inside the inference module.

PatchCore (a memory bank) and FastFlow (trained, with the frozen-feature cache) are fitted on small
synthetic canvases (96 px, 64 px tiles at stride 32: 4 tiles); ``adx test --ckpt`` restores the tiling from
the checkpoint, and the ONNX and OpenVINO bundles give torch's numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import CONFIGS, quiet_cli, synthetic_cli

from adx.cli import main
from adx.data.samples import AdxDataError
from adx.deploy import Inferencer
from adx.deploy_cli import load_model
from adx.inference import OUTPUT_NAMES
from adx.models.components.coreset import sample_size
from adx.tiling import TileGrid

CANVAS, TILE, STRIDE = 96, 64, 32
TILING = ["--data.tile_size", str(TILE), "--data.tile_stride", str(STRIDE)]
SMALL = {
    "PatchCore": ["--model.coreset_ratio", "0.05"],
    "FastFlow": ["--model.flow_steps", "4", "--trainer.max_epochs", "2", "--model.zscore_map", "true"],
}
N_TRAIN = 12


def _fit(name: str, tmp: Path, *extra: str) -> Path:
    """Fit ``name`` on tiles of the synthetic canvases through ``adx fit`` (with its test); return the run."""
    data, runs = tmp / "data", tmp / "runs"
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / name.lower() / "demo.yaml"),
            *synthetic_cli(data, size=CANVAS, n_train=N_TRAIN, n_good=4, n_bad=6),
            *TILING,
            "--model.pretrained",
            "false",
            "--data.val_source",
            "test_split",
            *quiet_cli(runs),
            *SMALL.get(name, []),
            *extra,
        ]
    )
    (run,) = runs.glob("*/*/*/v*")
    return run


@pytest.fixture(scope="module", params=sorted(SMALL))
def fitted(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(model name, run folder, data root) of one tiled fit."""
    tmp = tmp_path_factory.mktemp(f"tiling_{request.param}")
    return request.param, _fit(request.param, tmp), tmp / "data"


def test_fit_on_tiles_and_test_ckpt_restores_the_tiling(fitted, tmp_path: Path) -> None:
    name, run, _ = fitted
    ckpt = run / "checkpoints" / "last.ckpt"
    report = json.loads((run / "metrics.json").read_text())
    assert report["data"]["tiling"] == {
        "canvas": [CANVAS, CANVAS],
        "tile_size": [TILE, TILE],
        "stride": [STRIDE, STRIDE],
        "tiles": 4,
        "train_tiles": True,
    }
    model = load_model(ckpt)
    assert model.tile_grid == TileGrid((CANVAS, CANVAS), (TILE, TILE), (STRIDE, STRIDE))
    if name == "PatchCore":  # the bank was selected from the tiles' patches (stride 8): 12 images x 4 tiles
        assert len(model.model.memory_bank) == sample_size(N_TRAIN * 4 * (TILE // 8) ** 2, 0.05)
    else:  # the zscore reference is per pixel of a tile
        assert tuple(model.model.map_mean.shape) == (TILE, TILE)
    # the checkpoint is the source of the tiling: a data module without it gives the same numbers
    main(
        [
            "test",
            "--ckpt",
            str(ckpt),
            "--data.tile_size",
            "null",
            "--data.tile_stride",
            "null",
            *quiet_cli(tmp_path / "runs"),
        ]
    )
    (again,) = (tmp_path / "runs").glob("*/*/*/v*/metrics.json")
    retest = json.loads(again.read_text())
    assert retest["data"]["tiling"]["tiles"] == 4
    for key, value in report["metrics"].items():
        assert retest["metrics"][key] == pytest.approx(value, abs=1e-6), key
    rows = {r["path"]: r for r in csv.DictReader((run / "scores.csv").open())}
    for row in csv.DictReader((again.parent / "scores.csv").open()):
        assert float(row["image_score"]) == pytest.approx(float(rows[row["path"]]["image_score"]), rel=1e-5)


def test_tiled_export_parity(fitted, tmp_path: Path) -> None:
    """ONNX Runtime and OpenVINO run the tiled graph (cut, model on all tiles, blend) as torch does."""
    name, run, data = fitted
    ckpt = run / "checkpoints" / "last.ckpt"
    model = load_model(ckpt)
    module = model.inference_module().eval()
    paths = sorted(p for p in (data / "test").rglob("*.png"))[:5]
    from adx.imageio import read_image

    base = torch.stack([torch.from_numpy(read_image(str(p))).permute(2, 0, 1) for p in paths])
    batches = [base, torch.nn.functional.interpolate(base, size=(120, 80), mode="bilinear")]
    for fmt in ("onnx", "openvino"):
        out = tmp_path / fmt
        main(["export", "--ckpt", str(ckpt), "--format", fmt, "--out", str(out)])
        meta = json.loads((out / "metadata.json").read_text())
        assert meta["input_size"] == [CANVAS, CANVAS] and meta["tiling"]["tiles"] == 4
        for runtime in ("onnxruntime", "openvino") if fmt == "onnx" else ("openvino",):
            inferencer = Inferencer(out, runtime=runtime)
            for batch in batches:
                with torch.no_grad():
                    ref = dict(zip(OUTPUT_NAMES, (v.numpy() for v in module(batch)), strict=True))
                got = inferencer.run(batch.contiguous().numpy())
                assert got["anomaly_map"].shape == (len(batch), CANVAS, CANVAS)
                for key in ("image_score", "anomaly_map"):
                    scale = max(1.0, float(np.abs(ref[key]).max()))
                    err = float(np.abs(got[key].astype(np.float64) - ref[key]).max())
                    assert err <= 1e-4 * scale, f"{name} {fmt}/{runtime}: {key} differs by {err:.2e}"
                for key in ("pred_score", "norm_map"):
                    assert float(np.nanmax(np.abs(got[key] - ref[key]))) <= 1e-4, f"{name} {runtime} {key}"


def test_tiling_errors_name_the_fix(synthetic_root: Path, tmp_path: Path) -> None:
    args = [
        "fit",
        "--config",
        str(CONFIGS / "patchcore" / "demo.yaml"),
        *synthetic_cli(tmp_path / "data", size=CANVAS),
        "--model.pretrained",
        "false",
        *quiet_cli(tmp_path / "runs"),
    ]
    with pytest.raises(
        AdxDataError, match=r"not a multiple of 16, the largest stride.*--data.tile_size 32 or 48"
    ):
        main([*args, "--data.tile_size", "40"])
    padim = [a.replace("patchcore", "padim") for a in args]
    with pytest.raises(AdxDataError, match="must be trained on the tiles"):
        main([*padim, "--data.tile_size", "64", "--data.train_tiles", "false"])
    with pytest.raises(ValueError, match="larger than the canvas"):  # jsonargparse wraps the data error
        main([*args, "--data.tile_size", "128"])
