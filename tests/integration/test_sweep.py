"""``adx sweep``: checked sweep files, Optuna samplers, resume without re-running, failed trials, results.

Most tests replace the trial subprocess by a fake ``adx fit`` that writes metrics.json from the trial's
command line (fast, and it records every call); the slow ones run real PatchCore trials on tiny data.
PatchCore logs no validation value, so its sweeps here name the test metric explicitly (AUROC).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.conftest import CONFIGS, synthetic_cli

from adx import sweep
from adx.cli import main as adx_main

DEMO = str(CONFIGS / "patchcore" / "demo.yaml")
FASTFLOW = str(CONFIGS / "fastflow" / "demo.yaml")
RATIO, NEIGHBORS, SIGMA, LR = (
    "model.init_args.coreset_ratio",
    "model.init_args.num_neighbors",
    "model.init_args.blur_sigma",
    "model.init_args.optimizer.init_args.lr",
)
AUROC = "test/image_AUROC"  # a test metric, named explicitly


def _write(path: Path, spec: dict | str) -> Path:
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


def _options(cmd: list[str]) -> dict[str, str]:
    """``--key value`` pairs of a trial command (last one wins, as in the adx parser)."""
    i = cmd.index("fit") + 1
    return {cmd[j][2:]: cmd[j + 1] for j in range(i, len(cmd) - 1, 2)}


class FakeFit:
    """Stands in for the ``adx fit`` subprocess: image_AUROC (and val/loss) are smooth functions of the params."""

    def __init__(self, fail_neighbors: int | None = None, interrupt_on_call: int | None = None) -> None:
        self.calls: list[dict[str, str]] = []
        self.run_dirs: list[Path] = []
        self.fail_neighbors, self.interrupt_on_call = fail_neighbors, interrupt_on_call

    def __call__(self, cmd: list[str], run_dir: Path, timeout: float | None) -> tuple[int, str]:
        opts = _options(cmd)
        assert opts["trainer.default_root_dir"] == str(run_dir) and run_dir.is_dir()
        if len(self.calls) + 1 == self.interrupt_on_call:
            raise KeyboardInterrupt
        self.calls.append(opts)
        self.run_dirs.append(run_dir)
        ratio, neighbors = float(opts.get(RATIO, 0.1)), int(opts.get(NEIGHBORS, 9))
        if neighbors == self.fail_neighbors:
            return 1, "Traceback (most recent call last):\nValueError: num_neighbors is cursed"
        auroc = 1.0 - (ratio - 0.2) ** 2 - 0.01 * neighbors - 0.001 * float(opts.get(SIGMA, 4.0))
        loss = 1 - auroc + float(opts.get(LR, 0.0))
        report = {"metrics": {"image_AUROC": auroc, "pixel_AUROC": 0.5}, "fit": {"val/loss": loss}}
        (run_dir / "metrics.json").write_text(json.dumps(report))
        return 0, ""


def _sweep(
    tmp_path: Path,
    spec: dict,
    *extra: str,
    fake: FakeFit | None = None,
    name: str = "s",
    config: str = DEMO,
) -> Path:
    out = tmp_path / f"out_{name}"
    sweep.main(
        [
            "--sweep",
            str(_write(tmp_path / f"{name}.yaml", spec)),
            "--config",
            config,
            "--out",
            str(out),
            *extra,
        ],
        fake,
    )
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def _csv(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "results.csv")))


def _assert_sorted(rows: list[dict], metric: str = AUROC, maximize: bool = True) -> None:
    ok = [float(r[metric]) for r in rows if r["status"] == "ok"]
    assert ok == sorted(ok, reverse=maximize)
    statuses = [r["status"] for r in rows]
    assert statuses == sorted(statuses, key=lambda s: s != "ok"), "failed trials come last"
    assert [r["rank"] for r in rows if r["status"] == "ok"] == [str(i) for i in range(1, len(ok) + 1)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "sampler: bayes\nparams: {a.b: [1, 2]}\n",
            r"sampler: 'bayes' is unknown; use one of grid, random, tpe",
        ),
        ("n_trial: 3\nparams: {a.b: [1]}\n", r"unknown key 'n_trial'.*did you mean 'n_trials'"),
        ("params: {a.b: {low: 0.1, high: 0.5}}\n", r"params.a.b: sampler grid needs a list of values"),
        ("sampler: random\nparams: {a.b: {low: 5.0, high: 1.0}}\n", r"low \(5.0\) must be smaller than high"),
        ("sampler: random\nparams: {a.b: {low: 1, high: 9}}\n", r"add type: int .* or type: float"),
        ("sampler: tpe\nparams: {a.b: {low: 0.0, high: 1.0, log: true}}\n", r"log: true needs low > 0"),
        ("sampler: tpe\nparams: {a.b: {low: 0.1, hi: 1.0}}\n", r"unknown range key\(s\) \['hi'\]"),
        ("params: {a.b: 0.1}\n", r"params.a.b: 0.1 is a single value; give a list"),
        ("params: {a.b: [1, 2, 1]}\n", r"repeated value\(s\) 1"),
        ("params: {--a.b: [1, 2]}\n", r"without the leading dashes"),
        ("metric: fit/val/loss\nparams: {a.b: [1, 2]}\n", r"say direction: minimize or direction: maximize"),
        ("direction: up\nparams: {a.b: [1, 2]}\n", r"direction must be maximize or minimize"),
        (
            "metric: image_AUROC\nparams: {a.b: [1, 2]}\n",
            r"metric image_AUROC is a test-set metric .*name the test metric explicitly as "
            r"metric: test/image_AUROC",
        ),
        ("metric: val/loss\nparams: {a.b: [1, 2]}\n", r"values logged during fit are named fit/val/loss"),
        ("metric: test/\nparams: {a.b: [1, 2]}\n", r"metric must be fit/<key> .* or test/<key>"),
        ("params: {}\n", r"needs params:"),
        ("sampler: grid\n", r"needs params:"),
        ("- a\n", r"must be a mapping"),
    ],
)
def test_bad_sweep_files_are_refused_with_the_key_named(tmp_path: Path, text: str, message: str) -> None:
    spec = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(SystemExit, match=message):
        sweep.main(["--sweep", str(spec), "--config", DEMO, "--out", str(tmp_path / "out")], FakeFit())
    assert not (tmp_path / "out").exists(), "nothing is written before the sweep file is valid"


def test_param_keys_and_values_are_checked_against_the_base_config(tmp_path: Path) -> None:
    fake = FakeFit()
    typo = {"metric": AUROC, "params": {"model.init_args.coreset_ratoi": [0.1, 0.2]}}
    with pytest.raises(
        SystemExit, match=r"(?s)coreset_ratoi = 0.1 is refused.*did you mean: .*coreset_ratio"
    ):
        _sweep(tmp_path, typo, fake=fake)
    with pytest.raises(SystemExit, match=r"(?s)num_neighbors = abc is refused.*Expected a <class 'int'>"):
        _sweep(tmp_path, {"metric": AUROC, "params": {NEIGHBORS: [3, "abc"]}}, fake=fake)
    with pytest.raises(SystemExit, match=r"needs n_trials"):
        _sweep(tmp_path, {"sampler": "random", "metric": AUROC, "params": {NEIGHBORS: [3, 5]}}, fake=fake)
    with pytest.raises(SystemExit, match=r"--model.num_neighbors is swept by params"):
        _sweep(
            tmp_path,
            {"metric": AUROC, "params": {NEIGHBORS: [3, 5]}},
            "--model.num_neighbors",
            "4",
            fake=fake,
        )
    with pytest.raises(SystemExit, match=r"sampler_args do not fit the tpe sampler"):
        spec = {
            "sampler": "tpe",
            "n_trials": 2,
            "sampler_args": {"n_startup": 1},
            "metric": AUROC,
            "params": {NEIGHBORS: [3, 5]},
        }
        _sweep(tmp_path, spec, fake=fake)
    assert fake.calls == [] and not (tmp_path / "out_s").exists()


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_run_n_distinct_trials(tmp_path: Path, sampler: str, capsys) -> None:
    spec = {
        "sampler": sampler,
        "n_trials": 10,
        "seed": 3,
        "metric": AUROC,
        "params": {
            RATIO: {"low": 0.01, "high": 0.5},
            NEIGHBORS: {"low": 1, "high": 9, "type": "int"},
            SIGMA: {"low": 0.5, "high": 8.0, "log": True},
        },
    }
    if sampler == "tpe":
        spec["sampler_args"] = {"n_startup_trials": 3}
    fake = FakeFit()
    out = _sweep(tmp_path, spec, fake=fake)
    assert len(fake.calls) == 10
    points = {(c[RATIO], c[NEIGHBORS], c[SIGMA]) for c in fake.calls}
    assert len(points) == 10, "n distinct trials"
    for c in fake.calls:
        assert 0.01 <= float(c[RATIO]) <= 0.5 and 0.5 <= float(c[SIGMA]) <= 8.0
        assert c[NEIGHBORS].isdigit() and 1 <= int(c[NEIGHBORS]) <= 9
    records = _records(out)
    assert [r["number"] for r in records] == list(range(10)) and {r["status"] for r in records} == {"ok"}
    assert [d.relative_to(out).as_posix() for d in fake.run_dirs] == [
        f"trials/t{i:03d}/v0" for i in range(10)
    ]
    rows = _csv(out)
    assert len(rows) == 10 and set(rows[0]) >= {
        RATIO,
        NEIGHBORS,
        SIGMA,
        "test/pixel_AUROC",
        "fit/val/loss",
        "run_dir",
    }
    _assert_sorted(rows)
    assert "[10/10]" in capsys.readouterr().out
    again = FakeFit()
    _sweep(tmp_path, spec, fake=again)
    assert again.calls == [] and "resuming" in capsys.readouterr().out


def test_interrupted_sweep_resumes_exactly_where_it_stopped(tmp_path: Path, capsys) -> None:
    spec = {
        "sampler": "tpe",
        "n_trials": 6,
        "metric": AUROC,
        "sampler_args": {"n_startup_trials": 2},
        "params": {RATIO: {"low": 0.01, "high": 0.5}, NEIGHBORS: [1, 3, 5, 7, 9]},
    }
    first = FakeFit(interrupt_on_call=4)  # Ctrl-C while trial t003 runs
    with pytest.raises(SystemExit) as stop:
        _sweep(tmp_path, spec, fake=first)
    assert stop.value.code == 130 and "Run the same command again to resume" in capsys.readouterr().err
    out = tmp_path / "out_s"
    assert [r["number"] for r in _records(out)] == [0, 1, 2]
    assert (out / "trials" / "t003" / "v0").is_dir() and not (out / sweep.LOCK_FILE).exists()

    second = FakeFit()
    _sweep(tmp_path, spec, fake=second)
    assert "resuming" in capsys.readouterr().out
    assert len(second.calls) == 3, "only the unfinished trials run"
    assert [d.relative_to(out).as_posix() for d in second.run_dirs] == [
        "trials/t003/v1",  # the interrupted trial gets a fresh folder; v0 is left as it was
        "trials/t004/v0",
        "trials/t005/v0",
    ]
    for t in ("t000", "t001", "t002"):
        assert [p.name for p in (out / "trials" / t).iterdir()] == ["v0"]

    # the resumed sweep drew exactly what an uninterrupted one draws (per-trial sampler seeds)
    straight = FakeFit()
    _sweep(tmp_path, spec, fake=straight, name="straight")

    def points(calls: list[dict[str, str]]) -> list[tuple[str, str]]:
        return [(c[RATIO], c[NEIGHBORS]) for c in calls]

    assert points(first.calls + second.calls) == points(straight.calls)
    assert len(set(points(straight.calls))) == 6


def test_grid_failed_trials_lost_records_and_retry(tmp_path: Path, capsys) -> None:
    spec = {"sampler": "grid", "metric": AUROC, "params": {RATIO: [0.05, 0.2], NEIGHBORS: [1, 3, 9]}}
    fake = FakeFit(fail_neighbors=9)
    out = _sweep(tmp_path, spec, fake=fake)
    grid = {(r, n) for r in ("0.05", "0.2") for n in ("1", "3", "9")}
    assert {(c[RATIO], c[NEIGHBORS]) for c in fake.calls} == grid and len(fake.calls) == 6
    records = _records(out)
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["params"][NEIGHBORS] == 9 for r in failed)
    assert all("num_neighbors is cursed" in r["error"] and r["value"] is None for r in failed)
    rows = _csv(out)
    _assert_sorted(rows)
    assert rows[0][RATIO] == "0.2" and rows[0][NEIGHBORS] == "1", "best first"
    assert "num_neighbors is cursed" in rows[-1]["error"]
    md = (out / "results.md").read_text()
    assert "6/6 trials finished, 4 ok, 2 failed" in md and "--model.init_args.coreset_ratio 0.2" in md
    assert md.count("| failed |") == 2 and "num_neighbors is cursed" in md
    assert 'Ranked by `test/image_AUROC` (metrics.json["metrics"]["image_AUROC"]), a **test** metric' in md
    assert "> **Warning:** ranked by a test-set metric" in md
    printed = capsys.readouterr().out
    assert "FAILED: ValueError: num_neighbors is cursed" in printed
    assert "WARNING: ranking by test/image_AUROC, a test-set metric" in printed

    # a lost record (here: deleted line of t001) is run again, the others are not
    lines = (out / "trials.jsonl").read_text().splitlines(keepends=True)
    lost = json.loads(lines[1])
    (out / "trials.jsonl").write_text("".join(lines[:1] + lines[2:]))
    again = FakeFit(fail_neighbors=9)
    _sweep(tmp_path, spec, fake=again)
    assert [(c[RATIO], c[NEIGHBORS]) for c in again.calls] == [
        (sweep.cli_value(lost["params"][RATIO]), str(lost["params"][NEIGHBORS]))
    ]
    assert (
        len(_records(out)) == 6
        and {(str(r["params"][RATIO]), str(r["params"][NEIGHBORS])) for r in _records(out)} == grid
    )

    # --retry_failed runs the failed grid points again (now they succeed)
    fixed = FakeFit()
    _sweep(tmp_path, spec, "--retry_failed", fake=fixed)
    assert sorted((c[RATIO], c[NEIGHBORS]) for c in fixed.calls) == [("0.05", "9"), ("0.2", "9")]
    assert len((out / sweep.RETRIED_FILE).read_text().splitlines()) == 2
    rows = _csv(out)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    _assert_sorted(rows)


def test_a_different_sweep_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    spec = {"metric": AUROC, "params": {NEIGHBORS: [1, 3]}}
    _sweep(tmp_path, spec, "--data.image_size", "64", fake=FakeFit())
    with pytest.raises(SystemExit, match=r"holds a different sweep \(changed: params\)"):
        other = {"metric": AUROC, "params": {NEIGHBORS: [1, 5]}}
        _sweep(tmp_path, other, "--data.image_size", "64", fake=FakeFit())
    with pytest.raises(SystemExit, match=r"changed: config data.init_args.image_size"):
        _sweep(tmp_path, spec, "--data.image_size", "96", fake=FakeFit())
    fake = FakeFit()  # settings that do not change results may differ
    _sweep(tmp_path, spec, "--data.image_size", "64", "--data.num_workers", "0", "--n_trials", "2", fake=fake)
    assert fake.calls == []


def test_minimize_a_fit_metric(tmp_path: Path) -> None:
    spec = {"metric": "fit/val/loss", "direction": "minimize", "params": {RATIO: [0.05, 0.2, 0.4]}}
    out = _sweep(tmp_path, spec, fake=FakeFit())
    rows = _csv(out)
    assert [r[RATIO] for r in rows] == ["0.2", "0.05", "0.4"]
    _assert_sorted(rows, "fit/val/loss", maximize=False)
    md = (out / "results.md").read_text()
    assert 'Ranked by `fit/val/loss` (metrics.json["fit"]["val/loss"]), a **validation** metric' in md
    assert "Warning" not in md


def test_without_metric_trained_methods_rank_by_validation_loss(tmp_path: Path, capsys) -> None:
    spec = {"params": {LR: [0.003, 0.001, 0.002]}}  # no metric: the default, fit/val/loss
    fake = FakeFit()
    out = _sweep(tmp_path, spec, fake=fake, config=FASTFLOW)
    assert len(fake.calls) == 3
    state = json.loads((out / sweep.STATE_FILE).read_text())["spec"]
    assert (state["metric"], state["direction"]) == ("fit/val/loss", "minimize")
    rows = _csv(out)
    assert [r[LR] for r in rows] == ["0.001", "0.002", "0.003"], "lowest validation loss first"
    _assert_sorted(rows, "fit/val/loss", maximize=False)
    md = (out / "results.md").read_text()
    assert "Ranked by `fit/val/loss`" in md and "a **validation** metric" in md and "Warning" not in md
    assert "WARNING" not in capsys.readouterr().out


def test_without_metric_a_method_with_no_validation_value_is_refused(tmp_path: Path) -> None:
    fake = FakeFit()
    with pytest.raises(
        SystemExit,
        match=r"names no metric, and the default fit/val/loss .*PatchCore is not one.*metric: test/image_AUROC",
    ):
        _sweep(tmp_path, {"params": {NEIGHBORS: [1, 3]}}, fake=fake)
    assert fake.calls == [] and not (tmp_path / "out_s").exists()


def test_a_sweep_from_before_the_test_prefix_resumes(tmp_path: Path) -> None:
    spec = {"metric": AUROC, "params": {NEIGHBORS: [1, 3]}}
    out = _sweep(tmp_path, spec, fake=FakeFit())
    # the folder as sweeps wrote it when metric: image_AUROC (bare) meant the test metric
    state = json.loads((out / sweep.STATE_FILE).read_text())
    state["spec"]["metric"] = "image_AUROC"
    (out / sweep.STATE_FILE).write_text(json.dumps(state))
    records = _records(out)
    for r in records:
        r["metrics"] = {k.removeprefix("test/"): v for k, v in r["metrics"].items()}
    (out / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    again = FakeFit()
    _sweep(tmp_path, spec, fake=again)
    assert again.calls == []
    header = _csv(out)[0]
    assert "test/pixel_AUROC" in header and "pixel_AUROC" not in header


def test_sweep_and_cli_do_not_import_each_other() -> None:
    checks = [
        "import adx.runs; assert not {'adx.cli', 'adx.sweep'} & set(sys.modules), sorted(sys.modules)",
        "import adx.sweep; assert 'adx.cli' not in sys.modules, 'adx.sweep imports adx.cli'",
        "import adx.cli; assert 'adx.sweep' not in sys.modules, 'adx.cli imports adx.sweep'",
    ]
    for check in checks:
        done = subprocess.run([sys.executable, "-c", f"import sys; {check}"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_trial_subprocess_error_tail_and_timeout(tmp_path: Path) -> None:
    crash = "import sys; print('loading', file=sys.stderr); raise ValueError('bad coreset')"
    code, error = sweep.run_command([sys.executable, "-c", crash], tmp_path, None)
    assert code == 1 and error.splitlines()[-1] == "ValueError: bad coreset" and "loading" in error
    assert "bad coreset" in (tmp_path / "stderr.log").read_text()
    code, error = sweep.run_command([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path, 0.5)
    assert code != 0 and "timed out after 0.5 s" in error


# ---------------------------------------------------------------------------------------------- real runs


def _real_args(root: Path) -> list[str]:
    return [
        "--config",
        DEMO,
        *synthetic_cli(root, size=32),
    ]


@pytest.mark.slow
def test_real_grid_sweep_resumes_without_rerunning(tmp_path: Path, capsys) -> None:
    spec = _write(
        tmp_path / "grid.yaml",
        {
            "sampler": "grid",
            "metric": AUROC,
            "overrides": {"heatmaps.enabled": False, "model.init_args.progress": False},
            "params": {RATIO: [0.01, 0.1], NEIGHBORS: [1, 9]},
        },
    )
    out = tmp_path / "sweep"
    args = ["sweep", "--sweep", str(spec), *_real_args(tmp_path / "data"), "--out", str(out)]
    adx_main([*args, "--n_trials", "2"])
    first = {r["number"]: r for r in _records(out)}
    assert sorted(first) == [0, 1] and all(r["status"] == "ok" for r in first.values())
    stamps = {n: (out / r["run_dir"] / "metrics.json").stat().st_mtime_ns for n, r in first.items()}

    adx_main(args)  # same command, full grid: resumes
    assert "resuming" in capsys.readouterr().out
    records = _records(out)
    assert [r["number"] for r in records] == [0, 1, 2, 3]
    assert {(r["params"][RATIO], r["params"][NEIGHBORS]) for r in records} == {
        (0.01, 1),
        (0.01, 9),
        (0.1, 1),
        (0.1, 9),
    }
    for n, r in first.items():
        assert (out / r["run_dir"] / "metrics.json").stat().st_mtime_ns == stamps[n], (
            "finished trials are not re-run"
        )
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("trials/*/v*")) == [
        f"trials/t{i:03d}/v0" for i in range(4)
    ]
    for r in records:
        run = out / r["run_dir"]
        saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
        assert (saved["coreset_ratio"], saved["num_neighbors"]) == (
            r["params"][RATIO],
            r["params"][NEIGHBORS],
        )
        metrics = json.loads((run / "metrics.json").read_text())["metrics"]
        assert r["value"] == metrics["image_AUROC"] and r["metrics"]["test/AUPRO"] == metrics["AUPRO"]
        assert not (run / "heatmaps").exists(), "overrides reach every trial"
    rows = _csv(out)
    assert len(rows) == 4
    _assert_sorted(rows)
    md = (out / "results.md").read_text()
    assert "4/4 trials finished, 4 ok, 0 failed" in md and md.count("| ok |") == 4


@pytest.mark.slow
def test_real_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path: Path, capsys) -> None:
    spec = _write(
        tmp_path / "bad_ratio.yaml",
        {
            "sampler": "grid",
            "metric": AUROC,
            "overrides": {"heatmaps.enabled": False, "model.init_args.progress": False},
            "params": {RATIO: [2.0, 0.05]},  # 2.0 passes the parser but PatchCore refuses it
        },
    )
    out = tmp_path / "sweep"
    adx_main(["sweep", "--sweep", str(spec), *_real_args(tmp_path / "data"), "--out", str(out)])
    records = {r["params"][RATIO]: r for r in _records(out)}
    assert records[0.05]["status"] == "ok" and records[0.05]["value"] > 0
    bad = records[2.0]
    assert bad["status"] == "failed" and bad["value"] is None
    assert "coreset sampling ratio must be in (0, 1], got 2.0" in bad["error"]
    assert (out / bad["run_dir"] / "stderr.log").is_file()
    rows = _csv(out)
    assert [r["status"] for r in rows] == ["ok", "failed"] and "got 2.0" in rows[1]["error"]
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_load_and_their_params_parse(path: Path) -> None:
    spec = sweep.load_spec(path)
    assert spec.configs, f"{path.name} names its base config"
    base_args = [a for c in spec.configs for a in ("--config", c)] + spec.override_args()
    sweep.check_base(base_args, spec)  # raises SweepError naming a bad key or value
