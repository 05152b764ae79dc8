"""Several processes on CPU: a 2-process ``adx`` run (Lightning's ddp strategy, gloo) against 1 process.

The 2-process runs are real command lines in a subprocess, as a user types them: Lightning's ddp launcher
starts rank 1 by re-running the command, so it cannot run inside the pytest process.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import CONFIGS, synthetic_cli

from adx.cli import main
from adx.distributed import ShardSampler, even_batch_size, shard_bounds
from adx.runs import RANK_VARIABLES, RUN_DIR_ENV, RunDirError, run_dir_for_this_process

# 9 train / 3 validation / 9 test images: every split is uneven over 2 processes
DATA = {"n_train": 12, "n_good": 4, "n_bad": 5}
N_TEST = DATA["n_good"] + DATA["n_bad"]
STATE = {  # what each method fits from the training images
    "padim": ("model.mean", "model.inv_cov"),
    "patchcore": ("model.memory_bank",),
}
MODELS = list(STATE)
XFAIL: dict[str, str] = {}
"""model -> why its 2-process fit is expected to differ (e.g. before its cross-rank gather lands)."""
PARAMS = [
    pytest.param(m, marks=pytest.mark.xfail(reason=XFAIL[m], strict=True)) if m in XFAIL else m
    for m in MODELS
]
TWO_PROCESSES = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
TIMEOUT_S = 420


def _args(model: str, data: Path, runs: Path, heatmaps: bool) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / model / "demo.yaml"),
        *synthetic_cli(data, **DATA),
        "--data.val_ratio",
        "0.25",
        "--root_dir",
        str(runs),
        "--trainer.enable_progress_bar",
        "false",
        "--heatmaps.enabled",
        str(heatmaps).lower(),
    ]


def start_adx(args: list[str], cwd: Path) -> subprocess.Popen:
    """Start ``python -m adx.cli ARGS`` in a session of its own (so a hung rank can be killed with it)."""
    env = {k: v for k, v in os.environ.items() if k not in (*RANK_VARIABLES, RUN_DIR_ENV, "WORLD_SIZE")}
    env["ADX_OFFLINE"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "adx.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, what: str) -> str | None:
    """Wait for a started run (killing its ranks after TIMEOUT_S); None if it succeeded, else why not."""
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the ranks it launched
        out, _ = proc.communicate()
        return f"{what} did not finish in {TIMEOUT_S} s:\n{out[-4000:]}"
    return f"{what} failed (exit {proc.returncode}):\n{out[-4000:]}" if proc.returncode else None


def _state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _only_run(root: Path, model: str) -> Path:
    (run,) = root.glob(f"{model}/synthetic/demo/v*")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path | str | None]]:
    """Per model, the same fit on 2 processes (subprocess) and on 1 (in this process), on one dataset.

    The 2-process runs go side by side (each launches its ranks one after the other, so two runs use the
    two cores of a CI machine); the synthetic images do not exist yet, so every process asks for them.
    Also a 2-process ``adx predict`` from the 1-process PaDiM checkpoint. A failed 2-process run is kept
    as ``error`` and fails only its model's tests.
    """
    base = tmp_path_factory.mktemp("ddp")
    data = base / "data" / "demo"
    two = {
        m: start_adx([*_args(m, data, base / m / "two", heatmaps=True), *TWO_PROCESSES], base) for m in MODELS
    }
    out: dict[str, dict] = {m: {"data": data} for m in MODELS}
    predict = None
    try:
        for model in MODELS:
            main(_args(model, data, base / model / "one", heatmaps=False))
            out[model]["one"] = _only_run(base / model / "one", model)
            if model == "padim":
                ckpt = out[model]["one"] / "checkpoints" / "last.ckpt"
                args = ["predict", "--ckpt", str(ckpt), "--data.path", str(data / "test")]
                predict = start_adx([*args, "--heatmaps.enabled", "false", *TWO_PROCESSES], base)
    finally:
        for model, proc in two.items():
            out[model]["error"] = finish(proc, f"adx fit of {model} on 2 processes")
        if predict is not None:
            out["padim"]["predict_error"] = finish(predict, "adx predict on 2 processes")
    for model in MODELS:
        if out[model]["error"] is None:
            out[model]["two"] = _only_run(base / model / "two", model)
    out["padim"]["predict"] = sorted(out["padim"]["one"].parent.iterdir())[-1]
    return out


def _ran(runs: dict, model: str, error: str = "error") -> dict:
    """The runs of ``model``, failing the test with the 2-process output if that run failed."""
    if runs[model][error]:
        pytest.fail(runs[model][error], pytrace=False)
    return runs[model]


@pytest.mark.slow
@pytest.mark.parametrize("model", PARAMS)
def test_two_processes_fit_what_one_fits(runs: dict, model: str) -> None:
    one, two = _state(_ran(runs, model)["one"]), _state(runs[model]["two"])
    for key in STATE[model]:
        assert one[key].shape == two[key].shape, key
        scale = float(one[key].abs().max())
        diff = float((one[key] - two[key]).abs().max())
        assert diff <= 1e-4 * scale, f"{key}: max |1 process - 2 processes| = {diff:.3g} (scale {scale:.3g})"


@pytest.mark.slow
@pytest.mark.parametrize("model", PARAMS)
def test_two_processes_calibrate_on_every_rank_s_images(runs: dict, model: str) -> None:
    one, two = _state(_ran(runs, model)["one"]), _state(runs[model]["two"])
    for key in [k for k in one if k.startswith("calibrator.") and isinstance(one[k], torch.Tensor)]:
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-5), key
    report = json.loads((runs[model]["two"] / "metrics.json").read_text())
    assert report["calibration"]["n_normal"] == 3, "all 3 validation images, from both ranks, no repeats"


@pytest.mark.slow
@pytest.mark.parametrize("model", PARAMS)
def test_two_processes_write_one_run_folder_with_every_test_image_once(runs: dict, model: str) -> None:
    two, one = _ran(runs, model)["two"], runs[model]["one"]
    assert [p.name for p in two.parent.iterdir()] == ["v0"], "rank 1 must reuse rank 0's run folder"
    report = json.loads((two / "metrics.json").read_text())
    assert report["processes"] == 2 and report["n_test"] == N_TEST
    assert sorted(p.name for p in two.glob("*.json")) == ["metrics.json"]
    assert sorted(p.name for p in two.glob("*.csv")) == ["scores.csv"]
    rows, alone = _rows(two / "scores.csv"), _rows(one / "scores.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in alone], "every image once, in dataset order"
    for name, value in json.loads((one / "metrics.json").read_text())["metrics"].items():
        assert report["metrics"][name] == pytest.approx(value, abs=1e-4), name
    panels = sorted(p.relative_to(two / "heatmaps") for p in (two / "heatmaps").rglob("*.jpg"))
    assert len(panels) == N_TEST and not any("_" in p.stem for p in panels), panels


@pytest.mark.slow
def test_two_process_predict_writes_one_predictions_csv(runs: dict) -> None:
    pred = _ran(runs, "padim", "predict_error")["predict"]
    assert pred.name == "v1", "one new run folder for both ranks"
    assert sorted(p.name for p in pred.glob("*.csv")) == ["predictions.csv"], "parts joined and removed"
    expected = sorted(str(p) for p in (runs["padim"]["data"] / "test").rglob("*.png"))
    assert [r["path"] for r in _rows(pred / "predictions.csv")] == expected


# ---- pieces, in one process -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 9, 10, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_cover_everything_and_keep_order(n: int, world: int) -> None:
    if n < world:
        with pytest.raises(ValueError, match="at least one"):
            even_batch_size(n, world, 4)
        return
    seen: list[int] = []
    for r in range(world):
        start, stop = shard_bounds(n, world, r)
        sampler = ShardSampler(range(n), world, r)
        assert list(sampler) == list(range(start, stop)) and len(sampler) == stop - start >= 1
        seen += list(sampler)
    assert seen == list(range(n))
    for batch_size in (1, 2, 3, 4, 16):
        b = even_batch_size(n, world, batch_size)
        counts = {-(-len(ShardSampler(range(n), world, r)) // b) for r in range(world)}
        assert len(counts) == 1, (n, world, batch_size, b)


def _generate(root: str) -> str:
    from adx.data import make_synthetic

    return str(make_synthetic(root, n_train=6, n_test_good=2, n_test_bad=3, size=32))


@pytest.mark.skipif(sys.platform == "win32", reason="uses the fork start method")
def test_synthetic_data_is_generated_once_when_processes_ask_together(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        assert pool.map(_generate, [str(root)] * 3) == [str(root)] * 3
    alone = Path(_generate(str(tmp_path / "alone")))
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert files == sorted(p.relative_to(alone) for p in alone.rglob("*.png")) and len(files) == 14
    assert all((root / f).read_bytes() == (alone / f).read_bytes() for f in files)
    assert json.loads((root / ".adx_synthetic.json").read_text())["complete"]


def test_run_folder_is_made_by_rank_zero_and_reused_by_launched_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in (*RANK_VARIABLES, RUN_DIR_ENV):
        monkeypatch.delenv(key, raising=False)
    made = run_dir_for_this_process(tmp_path, "padim", "synthetic", "demo")
    assert made.name == "v0" and os.environ[RUN_DIR_ENV] == str(made)
    monkeypatch.setenv("LOCAL_RANK", "1")  # what Lightning's launcher gives rank 1
    assert run_dir_for_this_process(tmp_path, "padim", "synthetic", "demo") == made
    monkeypatch.delenv(RUN_DIR_ENV)  # a rank started by torchrun/SLURM: no way to know rank 0's folder
    with pytest.raises(RunDirError, match="--trainer.default_root_dir"):
        run_dir_for_this_process(tmp_path, "padim", "synthetic", "demo")
    assert [p.name for p in (tmp_path / "padim" / "synthetic" / "demo").iterdir()] == ["v0"]


def test_padim_n_features_above_the_backbone_channels_says_the_limit_and_the_fix() -> None:
    from adx.models.padim.torch_model import PadimModel

    with pytest.raises(ValueError) as info:
        PadimModel(pretrained=False, n_features=5000)
    message = str(info.value)
    assert "exceeds the 176 channels of tf_efficientnet_lite0 at strides (4, 8, 16)" in message
    assert "--model.n_features 176 or less" in message
