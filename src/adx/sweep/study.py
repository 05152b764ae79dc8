"""The Optuna side: samplers, replaying finished trials into a fresh study, and the trial loop."""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from adx.sweep.report import duration, fmt, metric_notice, print_summary, short_names, write_results
from adx.sweep.runner import (
    TRIALS_FILE,
    Runner,
    append_record,
    new_trial_dir,
    read_metrics,
)
from adx.sweep.spec import SweepError, SweepSpec, cli_value

INSTALL_HINT = 'pip install -e ".[sweep]"  (or: pip install "optuna>=3.5")'


class TrialFailed(Exception):
    """Raised inside the Optuna objective so that the trial is recorded as failed."""


class _NoTrialLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trial ")


def import_optuna() -> Any:
    """Optuna, quiet (adx prints its own line per trial), or a SweepError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise SweepError(f"needs optuna, which is not installed: {INSTALL_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:  # adx prints its own line per failed trial
        if not any(isinstance(f, _NoTrialLines) for f in handler.filters):
            handler.addFilter(_NoTrialLines())
    return optuna


def make_sampler(optuna: Any, spec: SweepSpec, number: int) -> Any:
    """The Optuna sampler for trial ``number``.

    Random and TPE get seed + number: a resumed sweep draws exactly what an uninterrupted one would,
    instead of replaying the first draws of the seed. Grid keeps the seed: it fixes the grid's order.
    """
    samplers = optuna.samplers
    try:
        if spec.sampler == "grid":
            space = {k: list(p.choices) for k, p in spec.params.items()}
            return samplers.GridSampler(space, seed=spec.seed, **spec.sampler_args)
        cls = samplers.RandomSampler if spec.sampler == "random" else samplers.TPESampler
        return cls(seed=spec.seed + number, **spec.sampler_args)
    except TypeError as exc:
        raise SweepError(f"sampler_args do not fit the {spec.sampler} sampler: {exc}") from None


def replay(optuna: Any, study: Any, spec: SweepSpec, records: list[dict[str, Any]]) -> None:
    """Add finished trials to a fresh study with their original numbers (gaps become empty FAIL trials)."""
    dists = {k: p.distribution(optuna) for k, p in spec.params.items()}
    fail, complete = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE
    by_number = {r["number"]: r for r in records}
    for number in range(max(by_number, default=-1) + 1):
        rec = by_number.get(number)
        if rec is None:  # deleted or retried: leaves its grid point unvisited
            study.add_trial(optuna.trial.create_trial(state=fail))
            continue
        ok = rec["status"] == "ok"
        study.add_trial(
            optuna.trial.create_trial(
                state=complete if ok else fail,
                value=rec["value"] if ok else None,
                params=rec["params"],
                distributions=dists,
                system_attrs=rec.get("system_attrs") or {},
            )
        )


def _outcome(spec: SweepSpec, code: int, error: str, run_dir: Path) -> tuple[Any, dict[str, float], str]:
    """(metric value or None, all metrics, error) of a finished trial subprocess."""
    metrics: dict[str, float] = {}
    value = None
    if code == 0:
        try:
            metrics = read_metrics(run_dir)
        except (OSError, ValueError) as exc:
            error = f"the run wrote no readable metrics.json ({type(exc).__name__}: {exc}); is there a test split and --test_after_fit true?"
        else:
            value = metrics.get(spec.metric)
            if value is None:
                error = f"metric {spec.metric!r} is not in metrics.json; it has: {', '.join(metrics) or 'nothing'}"
            elif not math.isfinite(value):
                error, value = f"metric {spec.metric} is {value}", None
    return value, metrics, error


def run_trials(
    optuna: Any,
    spec: SweepSpec,
    sweep_dir: Path,
    records: list[dict[str, Any]],
    n_trials: int,
    fit_cmd: list[str],
    runner: Runner,
) -> Path:
    """Run trials one at a time until ``n_trials`` are recorded (``records`` are the finished ones)."""
    n_trials = max(n_trials, len(records))  # a smaller --n_trials than already run stops here
    study = optuna.create_study(direction=spec.direction)
    replay(optuna, study, spec, records)
    trials_path = sweep_dir / TRIALS_FILE
    names = short_names(list(spec.params))
    if records:
        n_ok = sum(r["status"] == "ok" for r in records)
        print(
            f"adx sweep: resuming {sweep_dir}: {len(records)} of {n_trials} trials finished "
            f"({n_ok} ok, {len(records) - n_ok} failed); they are not run again"
        )
    else:
        print(f"adx sweep: {spec.sampler} sweep of {n_trials} trials in {sweep_dir}")
    notice = metric_notice(spec.metric)
    if notice:
        print(notice)
    write_results(sweep_dir, spec, records, n_trials, fit_cmd)
    durations: list[float] = []
    holder: dict[str, Any] = {}

    def objective(trial: Any) -> float:
        params = {key: p.suggest(trial) for key, p in spec.params.items()}
        run_dir = new_trial_dir(sweep_dir, trial.number)
        values = [a for k, v in params.items() for a in (f"--{k}", cli_value(v))]
        cmd = [sys.executable, "-m", "adx.cli", *fit_cmd, *values, "--trainer.default_root_dir", str(run_dir)]
        t0 = time.perf_counter()
        try:
            code, error = runner(cmd, run_dir, spec.trial_timeout)
        except OSError as exc:
            code, error = -1, f"could not start the trial: {exc}"
        seconds = time.perf_counter() - t0
        value, metrics, error = _outcome(spec, code, error, run_dir)
        holder.update(
            number=trial.number,
            params=params,
            status="ok" if value is not None else "failed",
            value=value,
            metrics=metrics,
            seconds=round(seconds, 2),
            run_dir=str(run_dir.relative_to(sweep_dir)),
            error=error if value is None else None,
            command=shlex.join(cmd),
        )
        if value is None:
            raise TrialFailed(error)
        return float(value)

    while len(records) < n_trials:
        study.sampler = make_sampler(optuna, spec, len(study.trials))
        holder.clear()
        try:
            study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        except KeyboardInterrupt:
            print(
                f"\nadx sweep: interrupted; {len(records)} of {n_trials} trials are recorded in {trials_path}. "
                "Run the same command again to resume.",
                file=sys.stderr,
            )
            raise SystemExit(130) from None
        frozen = study.trials[-1]
        record = {
            **holder,
            "system_attrs": frozen.system_attrs,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        append_record(trials_path, record)
        records.append(record)
        write_results(sweep_dir, spec, records, n_trials, fit_cmd)
        durations.append(record["seconds"])
        left = n_trials - len(records)
        eta = f", ETA {duration(left * sum(durations) / len(durations))}" if left else ""
        shown = " ".join(f"{names[k]}={fmt(v)}" for k, v in record["params"].items())
        if record["status"] == "ok":
            outcome = f"{spec.metric} {fmt(record['value'])}"
        else:
            lines = (record["error"] or "failed").strip().splitlines()
            outcome = f"FAILED: {lines[-1][:200] if lines else 'failed'}"
        print(
            f"adx sweep: [{len(records)}/{n_trials}] t{record['number']:03d} {shown} -> {outcome} "
            f"({duration(record['seconds'])}{eta})",
            flush=True,
        )
    print_summary(sweep_dir, spec, records)
    return sweep_dir
