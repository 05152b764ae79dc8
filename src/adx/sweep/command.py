"""The ``adx sweep`` command line and ``run_sweep``: check everything, lock the sweep folder, run trials."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adx.sweep.config import check_base, config_diff
from adx.sweep.runner import (
    RETRIED_FILE,
    STATE_FILE,
    TRIALS_FILE,
    Runner,
    append_record,
    load_records,
    run_command,
    sweep_lock,
    write_atomic,
)
from adx.sweep.spec import SweepError, legacy_metric, load_spec, norm_key
from adx.sweep.study import import_optuna, make_sampler, run_trials

USAGE = """\
usage: adx sweep --sweep SWEEP.yaml [--config BASE.yaml ...] [--out DIR] [--n_trials N]
                 [--retry_failed] [--<config.key> VALUE ...]

Runs `adx fit` once per trial of a grid, random or TPE (Optuna) search over config overrides.

  --sweep FILE      sweep file: sampler, n_trials, seed, metric, direction, params, ... (docs/sweeps.md)
  --config FILE     base config(s), after those named by the sweep file's `config:` (repeatable)
  --out DIR         sweep folder (default <root_dir>/sweeps/<sweep file stem>/); an existing one resumes
  --n_trials N      total number of trials (overrides the sweep file)
  --retry_failed    run failed trials again (their records move to trials.retried.jsonl)
  --KEY VALUE       any other option is passed to every trial's `adx fit` (e.g. --data.root DIR)

Trials are ranked by the sweep file's metric: fit/val/loss (validation) unless it names another;
a test metric must be named with its test/ prefix (test/image_AUROC), and results.md then warns.
Outputs in the sweep folder: trials/t<NNN>/v<N>/ (one run folder per trial), trials.jsonl,
results.csv and results.md (sorted by the metric, failed trials last).
"""
IDENTITY_KEYS = ("sampler", "seed", "metric", "direction", "params", "sampler_args")


@dataclass
class SweepArgs:
    sweep: Path
    configs: list[str]
    out: Path | None
    n_trials: int | None
    retry_failed: bool
    passthrough: list[str]


def parse_args(argv: Sequence[str]) -> SweepArgs:
    """Parse ``adx sweep`` options; any other ``--key value`` is passed on to every trial."""
    argv = list(argv)
    values: dict[str, Any] = {"--sweep": None, "--out": None, "--n_trials": None}
    configs: list[str] = []
    passthrough: list[str] = []
    retry = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--retry_failed":
            retry, i = True, i + 1
            continue
        if name in ("--config", *values):
            if eq:
                value, i = inline, i + 1
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 2
            else:
                raise SweepError(f"{name} needs a value")
            if name == "--config":
                configs.append(value)
            else:
                values[name] = value
            continue
        if name in ("--trainer.default_root_dir", "--print_config"):
            raise SweepError(f"{name} cannot be passed to a sweep (each trial gets its own run folder)")
        passthrough.append(arg)
        i += 1
    if values["--sweep"] is None:
        raise SweepError("--sweep FILE is required (adx sweep --help)")
    n_trials = values["--n_trials"]
    if n_trials is not None:
        try:
            n_trials = int(n_trials)
        except ValueError:
            raise SweepError(f"--n_trials must be a whole number, got {n_trials!r}") from None
        if n_trials < 1:
            raise SweepError(f"--n_trials must be at least 1, got {n_trials}")
    if passthrough and not passthrough[0].startswith("--"):
        raise SweepError(f"unexpected argument {passthrough[0]!r}; overrides are --key value pairs")
    return SweepArgs(
        sweep=Path(values["--sweep"]),
        configs=configs,
        out=Path(values["--out"]) if values["--out"] else None,
        n_trials=n_trials,
        retry_failed=retry,
        passthrough=passthrough,
    )


def _check_same_sweep(state_path: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume a sweep folder that holds a different sweep, naming what changed."""
    old = json.loads(state_path.read_text())
    old_spec = dict(old["spec"])
    if isinstance(old_spec.get("metric"), str):  # sweeps made before test metrics took the test/ prefix
        old_spec["metric"] = legacy_metric(old_spec["metric"])
    changed = [k for k in IDENTITY_KEYS if old_spec.get(k) != identity["spec"][k]]
    changed += [f"config {k}" for k in config_diff(old.get("base", {}), identity["base"])]
    if changed:
        raise SweepError(
            f"{state_path.parent} holds a different sweep (changed: {', '.join(changed[:8])}); "
            "resume it with the same sweep file and configs, or start a new one with --out DIR"
        )


def run_sweep(args: SweepArgs, runner: Runner | None = None) -> Path:
    """Run (or resume) a sweep; returns its folder."""
    runner = runner or run_command
    spec = load_spec(args.sweep)
    optuna = import_optuna()
    make_sampler(optuna, spec, 0)  # sampler_args checked before any work
    configs = [*spec.configs, *args.configs]
    if not configs:
        raise SweepError("no base config: pass --config FILE or set config: in the sweep file")
    swept = {norm_key(k) for k in spec.params}
    for arg in args.passthrough:
        if arg.startswith("--") and norm_key(arg) in swept:
            raise SweepError(
                f"{arg.split('=')[0]} is swept by params and cannot also be passed as an override"
            )
    base_args = [a for c in configs for a in ("--config", c)] + spec.override_args() + args.passthrough
    base = check_base(base_args, spec)

    if spec.sampler == "grid":
        n_trials = min(args.n_trials or spec.n_trials or spec.grid_size, spec.grid_size)
        if (args.n_trials or spec.n_trials or 0) > spec.grid_size:
            print(f"adx sweep: the grid has {spec.grid_size} points; running {spec.grid_size} trials")
    else:
        n_trials = args.n_trials or spec.n_trials
        if n_trials is None:
            raise SweepError(f"sampler {spec.sampler} needs n_trials (in {args.sweep} or --n_trials N)")

    sweep_dir = args.out or Path(str(base.get("root_dir") or "results")) / "sweeps" / args.sweep.stem
    identity = {"spec": spec.identity(), "base": base}
    state_path = sweep_dir / STATE_FILE
    if state_path.is_file():
        _check_same_sweep(state_path, identity)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    fit_cmd = ["fit", *base_args]
    with sweep_lock(sweep_dir):
        if not state_path.is_file():
            state = {
                **identity,
                "configs": configs,
                "fit_args": fit_cmd,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            write_atomic(state_path, json.dumps(state, indent=2, default=str))
        trials_path = sweep_dir / TRIALS_FILE
        records = load_records(trials_path)
        if args.retry_failed:
            failed = [r for r in records if r["status"] != "ok"]
            if failed:
                for r in failed:
                    append_record(sweep_dir / RETRIED_FILE, r)
                records = [r for r in records if r["status"] == "ok"]
                write_atomic(trials_path, "".join(json.dumps(r, default=str) + "\n" for r in records))
                print(f"adx sweep: retrying {len(failed)} failed trial(s); old records in {RETRIED_FILE}")
        return run_trials(optuna, spec, sweep_dir, records, n_trials, fit_cmd, runner)


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> None:
    """Entry point of ``adx sweep`` (``adx.cli.main`` dispatches here)."""
    run_sweep(parse_args(sys.argv[1:] if argv is None else argv), runner)
