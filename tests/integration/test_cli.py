"""The adx command end to end on tiny synthetic data: fit, test/predict from a checkpoint, configs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from tests.conftest import CONFIGS, synthetic_cli

from adx.cli import main

pytestmark = pytest.mark.slow


def _fit_args(root: Path, runs: Path, model: str = "patchcore") -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / model / "demo.yaml"),
        *synthetic_cli(root),
        "--root_dir",
        str(runs),
        "--trainer.enable_progress_bar",
        "false",
    ]


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cli")
    main([*_fit_args(base / "data", base / "runs"), "--model.coreset_ratio", "0.05"])
    (run,) = (base / "runs").glob("patchcore/synthetic/demo/v*")
    return run


def test_fit_writes_a_complete_run_folder(fitted_run: Path) -> None:
    assert fitted_run.name == "v0"
    for name in ("config.yaml", "metrics.json", "scores.csv", "checkpoints/last.ckpt"):
        assert (fitted_run / name).is_file(), name
    report = json.loads((fitted_run / "metrics.json").read_text())
    assert set(report["metrics"]) >= {"image_AUROC", "pixel_AUROC", "AUPRO", "image_F1max", "pixel_F1max"}
    assert report["n_test"] == 10 and report["n_anomalous"] == 6
    assert "train_split" in report["calibration"]["source"]
    assert report["weights"]["sha256"], "the backbone weights file and hash are recorded"
    assert len(list((fitted_run / "heatmaps").rglob("*.jpg"))) == 10
    saved = yaml.safe_load((fitted_run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["coreset_ratio"] == 0.05


def test_test_and_predict_from_checkpoint_alone(fitted_run: Path, tmp_path: Path) -> None:
    ckpt = fitted_run / "checkpoints" / "last.ckpt"
    main(["test", "--ckpt", str(ckpt), "--heatmaps.enabled", "false"])
    runs = sorted(fitted_run.parent.glob("v*"))
    assert [r.name for r in runs] == ["v0", "v1"], "a new run never overwrites an old one"
    first = json.loads((fitted_run / "metrics.json").read_text())["metrics"]
    again = json.loads((runs[1] / "metrics.json").read_text())["metrics"]
    assert again["image_AUROC"] == pytest.approx(first["image_AUROC"])  # no re-fitting, same model
    images = Path(yaml.safe_load((fitted_run / "config.yaml").read_text())["data"]["init_args"]["root"])
    main(["predict", "--ckpt", str(ckpt), "--data.path", str(images / "test" / "defect")])
    pred_run = sorted(fitted_run.parent.glob("v*"))[-1]
    rows = list(csv.DictReader(open(pred_run / "predictions.csv")))
    assert len(rows) == 6 and all(0.0 <= float(r["pred_score"]) <= 1.0 for r in rows)
    assert len(list((pred_run / "heatmaps").rglob("*.jpg"))) == 6


def test_print_config_layers_overrides_and_interpolation(tmp_path: Path, capsys) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "data:\n  init_args:\n    image_size: 96\nmodel:\n  init_args:\n    blur_sigma: ${data.init_args.image_size}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "patchcore" / "demo.yaml"),
                "--config",
                str(extra),
                "--model.coreset_ratio",
                "0.01",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["coreset_ratio"] == 0.01
    assert printed["data"]["init_args"]["image_size"] == 96
    assert printed["model"]["init_args"]["blur_sigma"] == 96


def test_unknown_key_is_named(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "patchcore" / "demo.yaml"),
                "--model.coreset_ratoi",
                "0.1",
                "--root_dir",
                str(tmp_path),
            ]
        )
    assert "coreset_ratoi" in capsys.readouterr().err


def test_padim_demo_runs(tmp_path: Path) -> None:
    main(_fit_args(tmp_path / "data", tmp_path / "runs", "padim") + ["--model.n_features", "32"])
    (run,) = (tmp_path / "runs").glob("padim/synthetic/demo/v0")
    assert json.loads((run / "metrics.json").read_text())["metrics"]["image_AUROC"] > 0.6


def test_bad_checkpoints_are_refused_before_work(fitted_run: Path, tmp_path: Path, capsys) -> None:
    import torch

    ckpt = fitted_run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["adx_format"] >= 1 and state["adx_model"] == "PatchCore"
    old = dict(state)
    del old["adx_format"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(SystemExit, match="not written by this version of adx"):
        main(["test", "--ckpt", str(tmp_path / "old.ckpt")])
    newer = dict(state, adx_format=state["adx_format"] + 1)
    torch.save(newer, tmp_path / "newer.ckpt")
    with pytest.raises(SystemExit, match="checkpoint format"):
        main(["test", "--ckpt", str(tmp_path / "newer.ckpt")])
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        main(["test", "--ckpt", str(tmp_path / "junk.ckpt")])
    root = yaml.safe_load((fitted_run / "config.yaml").read_text())["data"]["init_args"]["root"]
    with pytest.raises(Exception, match="holds a PatchCore model, but the config builds Padim"):
        main(
            [
                "test",
                "--config",
                str(CONFIGS / "padim" / "demo.yaml"),
                "--data.root",
                root,
                "--data.image_size",
                "64",
                "--root_dir",
                str(tmp_path / "runs"),
                "--ckpt",
                str(ckpt),
            ]
        )


def test_pinned_run_folder_is_not_reused_by_test(tmp_path: Path) -> None:
    pinned = tmp_path / "trial" / "v0"  # as adx sweep pins each trial's folder
    args = _fit_args(tmp_path / "data", tmp_path / "runs") + ["--trainer.default_root_dir", str(pinned)]
    main([*args, "--model.coreset_ratio", "0.05", "--heatmaps.enabled", "false"])
    before = sorted(p.name for p in pinned.iterdir())
    assert "metrics.json" in before
    main(["test", "--ckpt", str(pinned / "checkpoints" / "last.ckpt"), "--heatmaps.enabled", "false"])
    assert sorted(p.name for p in pinned.iterdir()) == before, "the pinned folder is left as it was"
    (fresh,) = (tmp_path / "runs").glob("patchcore/synthetic/demo/v*")
    assert (fresh / "metrics.json").is_file()


def test_checkpoint_alone_uses_its_embedded_config(fitted_run: Path, tmp_path: Path) -> None:
    lone = tmp_path / "moved" / "deep" / "model.ckpt"  # no config.yaml beside or above it
    lone.parent.mkdir(parents=True)
    shutil.copy(fitted_run / "checkpoints" / "last.ckpt", lone)
    before = set(fitted_run.parent.glob("v*"))
    main(["test", "--ckpt", str(lone), "--heatmaps.enabled", "false"])
    (new,) = set(fitted_run.parent.glob("v*")) - before
    first = json.loads((fitted_run / "metrics.json").read_text())["metrics"]
    assert json.loads((new / "metrics.json").read_text())["metrics"]["image_AUROC"] == pytest.approx(
        first["image_AUROC"]
    )


def test_checkpoint_restores_without_the_weights_file(fitted_run: Path, monkeypatch) -> None:
    """Testing a checkpoint reads no pretrained weights file: it holds the weights and their provenance."""
    import adx.models.components.extractor as extractor

    def unavailable(*args, **kwargs):
        raise AssertionError("the backbone weights file was looked up while restoring a checkpoint")

    monkeypatch.setattr(extractor, "load_pretrained", unavailable)
    main(["test", "--ckpt", str(fitted_run / "checkpoints" / "last.ckpt"), "--heatmaps.enabled", "false"])
    latest = max(fitted_run.parent.glob("v*"), key=lambda p: int(p.name[1:]))
    first = json.loads((fitted_run / "metrics.json").read_text())
    again = json.loads((latest / "metrics.json").read_text())
    assert again["weights"]["sha256"] == first["weights"]["sha256"] != ""
    assert again["metrics"]["image_AUROC"] == pytest.approx(first["metrics"]["image_AUROC"])


def test_checkpoint_with_pickled_objects_is_refused(fitted_run: Path, tmp_path: Path) -> None:
    import torch

    state = torch.load(fitted_run / "checkpoints" / "last.ckpt", weights_only=True)
    state["payload"] = Path("x")  # an object that weights_only loading does not allow
    bad = tmp_path / "bad.ckpt"
    torch.save(state, bad)
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        main(["test", "--ckpt", str(bad)])


def test_k_shot_run_lists_its_images(tmp_path: Path) -> None:
    args = _fit_args(tmp_path / "data", tmp_path / "runs")
    main([*args, "--data.k_shot", "2", "--data.val_source", "test_split", "--heatmaps.enabled", "false"])
    (run,) = (tmp_path / "runs").glob("patchcore/synthetic/demo/v*")
    listed = (run / "k_shot.txt").read_text().split()
    assert len(listed) == 2 and all(Path(p).is_file() and "train" in p for p in listed)
    source = json.loads((run / "metrics.json").read_text())["calibration"]["source"]
    assert "fitted on 2 normal images (k-shot, seed 0)" in source, source
