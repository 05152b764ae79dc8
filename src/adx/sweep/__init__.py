"""``adx sweep``: grid, random or TPE search over config overrides, one ``adx fit`` run folder per trial.

A sweep file (YAML) names the samplers' search space as dotted config keys (as on the command line)::

    config: ../fastflow/demo.yaml           # optional; paths relative to this file; --config adds more
    sampler: tpe                            # grid | random | tpe  (Optuna's samplers)
    n_trials: 8                             # random/tpe: required; grid: all combinations by default
    metric: fit/val/loss                    # the default; fit/<key> of metrics.json["fit"] or
    direction: minimize                     #   test/<key> of metrics.json["metrics"] (test labels!)
    overrides: {heatmaps.enabled: false}    # fixed for every trial
    params:
      model.init_args.optimizer.init_args.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
      model.init_args.flow_steps: [4, 8]

Each trial runs ``python -m adx.cli fit ... --trainer.default_root_dir <sweep>/trials/t<NNN>/v<N>`` in a
subprocess, so a crash or out-of-memory of one trial leaves the sweep running. Finished trials are appended
to ``<sweep>/trials.jsonl``; re-running the same command replays them into a fresh Optuna study and carries
on where it stopped. ``results.csv`` and ``results.md`` are rewritten after every trial, sorted by the metric.

Modules: ``spec`` (the sweep file), ``config`` (the base config, checked by adx's parser), ``runner`` (a
trial subprocess, records, lock), ``study`` (Optuna samplers and the trial loop), ``report`` (results files),
``command`` (the command line). Importing this package does not import ``adx.cli``.
"""

from adx.sweep.command import USAGE, SweepArgs, main, parse_args, run_sweep
from adx.sweep.config import IDENTITY_IGNORED, check_base, parse_config
from adx.sweep.report import sorted_records, write_results
from adx.sweep.runner import (
    LOCK_FILE,
    RETRIED_FILE,
    STATE_FILE,
    STDERR_LINES,
    TRIALS_FILE,
    Runner,
    load_records,
    read_metrics,
    run_command,
    stderr_tail,
)
from adx.sweep.spec import (
    DEFAULT_DIRECTION,
    DEFAULT_METRIC,
    RANGE_KEYS,
    SAMPLERS,
    TOP_KEYS,
    Param,
    SweepError,
    SweepSpec,
    cli_value,
    load_spec,
    metric_split,
)
from adx.sweep.study import INSTALL_HINT, TrialFailed, make_sampler

__all__ = [
    "DEFAULT_DIRECTION",
    "DEFAULT_METRIC",
    "IDENTITY_IGNORED",
    "INSTALL_HINT",
    "LOCK_FILE",
    "RANGE_KEYS",
    "RETRIED_FILE",
    "SAMPLERS",
    "STATE_FILE",
    "STDERR_LINES",
    "TOP_KEYS",
    "TRIALS_FILE",
    "USAGE",
    "Param",
    "Runner",
    "SweepArgs",
    "SweepError",
    "SweepSpec",
    "TrialFailed",
    "check_base",
    "cli_value",
    "load_records",
    "load_spec",
    "main",
    "make_sampler",
    "metric_split",
    "parse_args",
    "parse_config",
    "read_metrics",
    "run_command",
    "run_sweep",
    "sorted_records",
    "stderr_tail",
    "write_results",
]
