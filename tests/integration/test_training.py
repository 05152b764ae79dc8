"""Training life cycle through the adx command: best/last checkpoints, resume, seeds, early stopping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tests.conftest import CONFIGS, quiet_cli, synthetic_cli

from adx.cli import main

pytestmark = pytest.mark.slow


def _args(root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / "fastflow" / "demo.yaml"),
        *synthetic_cli(root, size=32, n_train=8, n_good=2, n_bad=2),
        "--model.pretrained",
        "false",
        *quiet_cli(runs),
        *extra,
    ]


def _runs(runs: Path) -> list[Path]:
    return sorted(runs.glob("fastflow/synthetic/*/v*"), key=lambda p: int(p.name[1:]))


def test_best_and_last_checkpoints_then_resume(tmp_path: Path) -> None:
    data, runs = tmp_path / "data", tmp_path / "runs"
    main(_args(data, runs, "--trainer.max_epochs", "2", "--checkpoint.monitor", "val/loss"))
    (first,) = _runs(runs)
    ckpts = sorted(p.name for p in (first / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-epoch") for n in ckpts), ckpts
    report = json.loads((first / "metrics.json").read_text())
    assert (
        report["fit"]["epochs"] == 2 and "val/loss" in report["fit"] and "train/loss_epoch" in report["fit"]
    )
    last = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1 and last["optimizer_states"], "last.ckpt holds the optimizer for resuming"

    main(["fit", "--ckpt", str(first / "checkpoints" / "last.ckpt"), "--trainer.max_epochs", "3"])
    first_again, second = _runs(runs)
    assert first_again == first, "resuming never writes into the old run folder"
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["global_step"] == last["global_step"] * 3 // 2
    assert json.loads((second / "metrics.json").read_text())["fit"]["epochs"] == 3


class CrashAtEpoch(Callback):
    """Stands in for a kill or power cut at the start of epoch ``epoch`` (once per test process)."""

    crashed = False

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.current_epoch == self.epoch and not CrashAtEpoch.crashed:
            CrashAtEpoch.crashed = True
            raise RuntimeError("simulated crash")


def test_a_crashed_run_can_resume_from_its_last_completed_epoch(tmp_path: Path) -> None:
    # no --checkpoint.monitor: nothing is ranked, yet last.ckpt must follow every epoch
    data, runs = tmp_path / "data", tmp_path / "runs"
    crash = tmp_path / "crash.yaml"
    crash.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.integration.test_training.CrashAtEpoch\n"
        "      init_args:\n        epoch: 2\n"
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_args(data, runs, "--config", str(crash), "--trainer.max_epochs", "4"))
    (run,) = _runs(runs)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1, "last.ckpt holds the last completed epoch (0-based)"
    main(["fit", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--trainer.max_epochs", "4"])
    assert json.loads((_runs(runs)[-1] / "metrics.json").read_text())["fit"]["epochs"] == 4


@pytest.mark.parametrize("fixed", [False, True])
def test_resumed_schedule_follows_the_new_max_epochs(tmp_path: Path, fixed: bool) -> None:
    data, runs = tmp_path / "data", tmp_path / "runs"
    sched = ["--model.scheduler", "adx.models.components.flows.WarmupCosineLR"]
    sched += ["--model.scheduler.max_epochs", "2"] if fixed else []
    main(_args(data, runs, "--trainer.max_epochs", "2", *sched))
    (first,) = _runs(runs)
    main(["fit", "--ckpt", str(first / "checkpoints" / "last.ckpt"), "--trainer.max_epochs", "4"])
    state = torch.load(_runs(runs)[-1] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    horizon = state["lr_schedulers"][0]["max_epochs"]
    lr = state["optimizer_states"][0]["param_groups"][0]["lr"]
    base = state["lr_schedulers"][0]["base_lrs"][0]
    # 4 epochs stepped: the end of a 4-epoch cosine, or past the end of a fixed 2-epoch one (min_ratio)
    assert horizon == (2 if fixed else 4)
    assert lr == pytest.approx(base * 1e-3)


def test_seeded_runs_reproduce_and_early_stopping_is_available(tmp_path: Path) -> None:
    data, runs = tmp_path / "data", tmp_path / "runs"
    main(_args(data, runs, "--trainer.max_epochs", "1", "--seed_everything", "3"))
    main(_args(data, runs, "--trainer.max_epochs", "1", "--seed_everything", "3"))
    a, b = (json.loads((r / "metrics.json").read_text()) for r in _runs(runs))
    assert a["fit"]["train/loss_epoch"] == b["fit"]["train/loss_epoch"]
    assert a["metrics"] == b["metrics"]
    stop = tmp_path / "early.yaml"
    stop.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
        "      init_args:\n        monitor: val/loss\n        patience: 0\n        min_delta: 1.0e9\n"
    )
    main(_args(data, runs, "--config", str(stop), "--trainer.max_epochs", "5"))
    report = json.loads((_runs(runs)[-1] / "metrics.json").read_text())
    assert report["fit"]["epochs"] < 5, "early stopping ended training before max_epochs"


def test_mixed_precision_trains(tmp_path: Path) -> None:
    # bf16 autocast runs on CPU, so the mixed-precision path (as 16-mixed takes on a GPU) is exercised here
    main(
        _args(
            tmp_path / "data",
            tmp_path / "runs",
            "--trainer.max_epochs",
            "1",
            "--trainer.precision",
            "bf16-mixed",
        )
    )
    report = json.loads((_runs(tmp_path / "runs")[-1] / "metrics.json").read_text())
    assert math.isfinite(report["fit"]["train/loss_epoch"]) and math.isfinite(report["fit"]["val/loss"])
    assert 0.0 <= report["metrics"]["image_AUROC"] <= 1.0


@pytest.mark.parametrize("method", ["fastflow", "cflow"])
def test_paper_config_is_one_command(method: str, tmp_path: Path) -> None:
    # configs/<method>/bottle.yaml as shipped, on a small MVTec-layout "bottle" with the images shrunk,
    # one epoch and random backbone weights (ResNet18 / WideResNet-50 weights do not install offline)
    from adx.data import make_synthetic

    make_synthetic(tmp_path / "data" / "bottle", n_train=8, n_test_good=2, n_test_bad=2, size=64)
    runs = tmp_path / "runs"
    warmup = ["--model.scheduler.init_args.warmup_epochs", "0"] if method == "cflow" else []
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / method / "bottle.yaml"),
            "--data.root",
            str(tmp_path / "data"),
            "--data.image_size",
            "64",
            "--data.batch_size",
            "4",
            "--data.num_workers",
            "0",
            "--model.pretrained",
            "false",
            "--trainer.max_epochs",
            "1",
            *warmup,
            *quiet_cli(runs),
        ]
    )
    (run,) = runs.glob(f"{method}/*/bottle/v0")
    config = (run / "config.yaml").read_text()
    assert ("resnet18" if method == "fastflow" else "wide_resnet50_2") in config
    report = json.loads((run / "metrics.json").read_text())
    assert report["fit"]["epochs"] == 1 and math.isfinite(report["fit"]["train/loss_epoch"])
    assert 0.0 <= report["metrics"]["image_AUROC"] <= 1.0


@pytest.mark.parametrize(("model", "modes"), [("fastflow", ("memory", "disk")), ("cflow", ("memory",))])
def test_frozen_feature_cache_leaves_training_unchanged(
    tmp_path: Path, model: str, modes, monkeypatch
) -> None:
    """Cached epochs skip the backbone (counted) yet train to the same weights, in memory and on disk."""
    from adx.models.components import extractor

    calls = {"n": 0}
    forward = extractor.Backbone.forward

    def counting(self, images):
        calls["n"] += len(images)
        return forward(self, images)

    monkeypatch.setattr(extractor.Backbone, "forward", counting)
    states, backbone_images = {}, {}
    for mode in ("off", *modes):
        runs = tmp_path / mode
        args = _args(tmp_path / "data", runs, "--trainer.max_epochs", "2", "--model.feature_cache", mode)
        args[2] = str(CONFIGS / model / "demo.yaml")
        if model == "cflow":
            args += [
                "--model.coupling_blocks",
                "2",
                "--model.strides",
                "[4, 8]",
                "--model.fiber_batch_size",
                "64",
            ]
        calls["n"] = 0
        main([*args, "--test_after_fit", "false"])
        (run,) = runs.glob(f"{model}/synthetic/*/v*")
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        states[mode] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        backbone_images[mode] = calls["n"]
    for mode in modes:
        assert states[mode].keys() == states["off"].keys()
        for key, value in states["off"].items():
            torch.testing.assert_close(states[mode][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        # cached: the backbone sees each training and validation image once; uncached, every epoch's
        # training, reference and validation passes run it again
        assert backbone_images[mode] == backbone_images[modes[0]] < backbone_images["off"], backbone_images
