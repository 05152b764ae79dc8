"""``adx sweep``: grid, random or TPE search over config overrides, one ``adx fit`` run folder per trial.

A sweep file (YAML) names the samplers' search space as dotted config keys (as on the command line)::

    config: ../patchcore/demo.yaml          # optional; paths relative to this file; --config adds more
    sampler: grid                           # grid | random | tpe  (Optuna's samplers)
    n_trials: 8                             # random/tpe: required; grid: all combinations by default
    seed: 0
    metric: image_AUROC                     # key of metrics.json["metrics"], or fit/<key> of metrics.json["fit"]
    direction: maximize                     # maximize | minimize (required for fit/ metrics)
    overrides: {heatmaps.enabled: false}    # fixed for every trial
    params:
      model.init_args.coreset_ratio: [0.01, 0.05, 0.1]              # list: categorical
      model.init_args.num_neighbors: {low: 1, high: 9, type: int}   # range: random/tpe only
      model.init_args.blur_sigma: {low: 1.0, high: 8.0, log: true}

Each trial runs ``python -m adx.cli fit ... --trainer.default_root_dir <sweep>/trials/t<NNN>/v<N>`` in a
subprocess, so a crash or out-of-memory of one trial leaves the sweep running. Finished trials (ok or
failed, with the last lines of stderr) are appended to ``<sweep>/trials.jsonl``; re-running the same command
replays them into a fresh in-memory Optuna study and carries on where it stopped. ``results.csv`` and
``results.md`` are rewritten after every trial, sorted by the metric, failed trials last.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SAMPLERS = ("grid", "random", "tpe")
TOP_KEYS = (
    "config",
    "sampler",
    "n_trials",
    "seed",
    "metric",
    "direction",
    "params",
    "overrides",
    "sampler_args",
    "trial_timeout",
)
RANGE_KEYS = ("low", "high", "type", "log", "step")
TRIALS_FILE = "trials.jsonl"
RETRIED_FILE = "trials.retried.jsonl"
STATE_FILE = "sweep.json"
LOCK_FILE = "sweep.lock"
STDERR_LINES = 15
INSTALL_HINT = 'pip install -e ".[sweep]"  (or: pip install "optuna>=3.5")'
# keys that do not change results: a resumed sweep may differ from the first run in these
IDENTITY_IGNORED = (
    "trainer.enable_progress_bar",
    "data.init_args.num_workers",
    "model.init_args.progress",
    "heatmaps.",
)
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

Outputs in the sweep folder: trials/t<NNN>/v<N>/ (one run folder per trial), trials.jsonl,
results.csv and results.md (sorted by the metric, failed trials last).
"""


class SweepError(SystemExit):
    """A problem with the sweep file or command line, reported before any trial runs."""

    def __init__(self, message: str) -> None:
        super().__init__(f"adx sweep: {message}")


class TrialFailed(Exception):
    """Raised inside the Optuna objective so that the trial is recorded as failed."""


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise SweepError(f"needs optuna, which is not installed: {INSTALL_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:  # adx prints its own line per failed trial
        if not any(isinstance(f, _NoTrialLines) for f in handler.filters):
            handler.addFilter(_NoTrialLines())
    return optuna


class _NoTrialLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trial ")


# ----------------------------------------------------------------------------------------------------
# sweep file


def cli_value(value: Any) -> str:
    """A value as it is written on the adx command line (YAML-readable)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:  # YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a float
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value)


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SweepError(f"{where} must be a number, got {value!r}")
    return value


@dataclass(frozen=True)
class Param:
    """One swept config key: a categorical list, or an int/float range."""

    key: str
    kind: str  # categorical | int | float
    choices: tuple[Any, ...] = ()
    low: float | int = 0
    high: float | int = 0
    log: bool = False
    step: float | int | None = None

    @classmethod
    def parse(cls, key: Any, value: Any) -> Param:
        if not isinstance(key, str) or not key:
            raise SweepError(f"params: keys are dotted config keys (strings), got {key!r}")
        if key.startswith("-"):
            raise SweepError(f"params: write {key.lstrip('-')!r} without the leading dashes")
        if key in ("trainer.default_root_dir", "config"):
            raise SweepError(f"params: {key!r} cannot be swept (the sweep sets it per trial)")
        if isinstance(value, list):
            if not value:
                raise SweepError(f"params.{key}: the list of values is empty")
            choices = tuple(
                v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v) for v in value
            )
            seen = [cli_value(v) for v in choices]
            dupes = sorted({v for v in seen if seen.count(v) > 1})
            if dupes:
                raise SweepError(f"params.{key}: repeated value(s) {', '.join(dupes)}")
            return cls(key, "categorical", choices=choices)
        if isinstance(value, dict):
            unknown = [k for k in value if k not in RANGE_KEYS]
            if unknown:
                raise SweepError(
                    f"params.{key}: unknown range key(s) {unknown}; a range takes {list(RANGE_KEYS)}, "
                    "a list gives categorical values"
                )
            if "low" not in value or "high" not in value:
                raise SweepError(f"params.{key}: a range needs both low and high, e.g. {{low: 1, high: 9}}")
            low, high = (
                _number(value["low"], f"params.{key}.low"),
                _number(value["high"], f"params.{key}.high"),
            )
            kind = value.get("type")
            if kind is None:
                if isinstance(low, int) and isinstance(high, int):
                    raise SweepError(
                        f"params.{key}: integer bounds {low}..{high}: add type: int (whole numbers) or "
                        "type: float (e.g. low: 0.0)"
                    )
                kind = "float"
            if kind not in ("int", "float"):
                raise SweepError(f"params.{key}.type must be int or float, got {kind!r}")
            if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
                raise SweepError(f"params.{key}: type int needs whole-number bounds, got {low}..{high}")
            if not low < high:
                raise SweepError(f"params.{key}: low ({low}) must be smaller than high ({high})")
            log = value.get("log", False)
            if not isinstance(log, bool):
                raise SweepError(f"params.{key}.log must be true or false, got {log!r}")
            if log and low <= 0:
                raise SweepError(f"params.{key}: log: true needs low > 0, got {low}")
            step = value.get("step")
            if step is not None:
                step = _number(step, f"params.{key}.step")
                if step <= 0:
                    raise SweepError(f"params.{key}.step must be > 0, got {step}")
                if log:
                    raise SweepError(f"params.{key}: step and log: true cannot be combined")
                if kind == "int" and not float(step).is_integer():
                    raise SweepError(f"params.{key}: type int needs a whole-number step, got {step}")
            if kind == "int":
                low, high, step = int(low), int(high), int(step) if step is not None else None
            else:
                low, high = float(low), float(high)
                step = float(step) if step is not None else None
            return cls(key, kind, low=low, high=high, log=log, step=step)
        raise SweepError(
            f"params.{key}: {value!r} is a single value; give a list of values ([{cli_value(value)}, ...]) "
            f"or a range ({{low: .., high: ..}}); fixed values belong under overrides:"
        )

    def distribution(self, optuna: Any) -> Any:
        d = optuna.distributions
        if self.kind == "categorical":
            return d.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def probe_values(self) -> list[Any]:
        """Values checked against the config parser before the sweep starts."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def describe(self) -> Any:
        if self.kind == "categorical":
            return list(self.choices)
        out: dict[str, Any] = {"low": self.low, "high": self.high, "type": self.kind, "log": self.log}
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass
class SweepSpec:
    """A checked sweep file."""

    path: Path
    sampler: str = "grid"
    n_trials: int | None = None
    seed: int = 0
    metric: str = "image_AUROC"
    direction: str = "maximize"
    params: dict[str, Param] = field(default_factory=dict)
    configs: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    sampler_args: dict[str, Any] = field(default_factory=dict)
    trial_timeout: float | None = None

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.choices) for p in self.params.values())

    def identity(self) -> dict[str, Any]:
        """What must not change between a sweep and its resumption."""
        return {
            "sampler": self.sampler,
            "seed": self.seed,
            "metric": self.metric,
            "direction": self.direction,
            "params": {k: p.describe() for k, p in self.params.items()},
            "sampler_args": self.sampler_args,
        }

    def override_args(self) -> list[str]:
        return [a for k, v in self.overrides.items() for a in (f"--{k}", cli_value(v))]


def load_spec(path: Path) -> SweepSpec:
    """Read and check a sweep file; every problem is named with its key and the fix."""
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"sweep file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {path} must be a mapping with at least params:")
    for key in raw:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(
                f"unknown key {key!r} in {path}{hint}; allowed keys: {', '.join(TOP_KEYS)}; "
                "config keys to sweep go under params:"
            )
    spec = SweepSpec(path=path)
    sampler = raw.get("sampler", "grid")
    if sampler not in SAMPLERS:
        raise SweepError(f"sampler: {sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
    spec.sampler = sampler
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path} needs params: a mapping of dotted config keys to lists or ranges")
    spec.params = {key: Param.parse(key, value) for key, value in params.items()}
    if sampler == "grid":
        ranges = [k for k, p in spec.params.items() if p.kind != "categorical"]
        if ranges:
            raise SweepError(
                f"params.{ranges[0]}: sampler grid needs a list of values, not a range; "
                "write the values as a list or use sampler: random or tpe"
            )
    for key in ("n_trials", "seed"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise SweepError(f"{key} must be a whole number, got {value!r}")
    if raw.get("n_trials") is not None and raw["n_trials"] < 1:
        raise SweepError(f"n_trials must be at least 1, got {raw['n_trials']}")
    spec.n_trials = raw.get("n_trials")
    spec.seed = raw.get("seed", 0) if raw.get("seed") is not None else 0
    metric = raw.get("metric", "image_AUROC")
    if not isinstance(metric, str) or not metric or metric == "fit/":
        raise SweepError(
            f"metric must be a metrics.json key such as image_AUROC or fit/val/loss, got {metric!r}"
        )
    spec.metric = metric
    direction = raw.get("direction")
    if direction is None and metric.startswith("fit/"):
        raise SweepError(f"metric {metric}: say direction: minimize or direction: maximize")
    direction = direction or "maximize"
    if direction not in ("maximize", "minimize"):
        raise SweepError(f"direction must be maximize or minimize, got {direction!r}")
    spec.direction = direction
    configs = raw.get("config") or []
    configs = [configs] if isinstance(configs, str) else configs
    if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise SweepError(f"config must be a path or a list of paths, got {raw.get('config')!r}")
    for c in configs:
        cpath = Path(c).expanduser()
        cpath = cpath if cpath.is_absolute() else Path(os.path.normpath(path.parent / cpath))
        if not cpath.is_file():
            raise SweepError(
                f"config: {c} (resolved to {cpath}) does not exist; paths are relative to {path}"
            )
        spec.configs.append(str(cpath))
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError("overrides must be a mapping of dotted config keys to values")
    clash = [k for k in overrides if _norm(k) in {_norm(p) for p in spec.params}]
    if clash:
        raise SweepError(f"{clash[0]!r} is both under overrides and params; keep it in one place")
    spec.overrides = {str(k).lstrip("-"): v for k, v in overrides.items()}
    sampler_args = raw.get("sampler_args") or {}
    if not isinstance(sampler_args, dict):
        raise SweepError("sampler_args must be a mapping of keyword arguments of the Optuna sampler")
    spec.sampler_args = sampler_args
    timeout = raw.get("trial_timeout")
    if timeout is not None:
        timeout = _number(timeout, "trial_timeout")
        if timeout <= 0:
            raise SweepError(f"trial_timeout must be > 0 seconds, got {timeout}")
    spec.trial_timeout = timeout
    return spec


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


# ----------------------------------------------------------------------------------------------------
# command line and base config


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


def _norm(key: str) -> str:
    """Dotted key without ``init_args`` parts and dashes: model.init_args.k and model.k compare equal."""
    return ".".join(p for p in key.lstrip("-").split("=")[0].split(".") if p != "init_args")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def parse_config(args: list[str]) -> tuple[dict[str, Any] | None, str]:
    """Parse ``adx fit`` arguments in-process with --print_config: (resolved config, parser error)."""
    from adx.cli import AdxCLI

    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            AdxCLI(args=["fit", *args, "--print_config"])
    except SystemExit as exc:
        code = exc.code
    if code not in (0, None):
        text = err.getvalue()
        start = text.rfind("error:")
        return None, (text[start:] if start >= 0 else text).strip()
    return yaml.safe_load(out.getvalue()) or {}, ""


def check_base(base_args: list[str], spec: SweepSpec) -> dict[str, Any]:
    """Resolve the base config and check every param value against the config parser, before any trial."""
    base, error = parse_config(base_args)
    if base is None:
        raise SweepError(f"the base config and overrides do not parse:\n{_indent(error)}")
    known = set(_flatten(base)) | {_norm(k) for k in _flatten(base)}
    for param in spec.params.values():
        for value in param.probe_values():
            _, error = parse_config([*base_args, f"--{param.key}", cli_value(value)])
            if error:
                close = difflib.get_close_matches(param.key, sorted(known), n=3, cutoff=0.75)
                hint = f"\ndid you mean: {', '.join(close)}?" if close and param.key not in known else ""
                raise SweepError(
                    f"params.{param.key} = {cli_value(value)} is refused by the base config:\n"
                    f"{_indent(error)}{hint}"
                )
    return base


def _indent(text: str, lines: int = 14) -> str:
    return "\n".join("  " + line for line in text.strip().splitlines()[:lines])


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in keys if not any(k == i or k.startswith(i) for i in IDENTITY_IGNORED)]


# ----------------------------------------------------------------------------------------------------
# trials


def run_command(cmd: list[str], run_dir: Path, timeout: float | None) -> tuple[int, str]:
    """Run one trial; stdout/stderr go to run_dir/stdout.log and stderr.log. Returns (exit code, error)."""
    with open(run_dir / "stdout.log", "wb") as out, open(run_dir / "stderr.log", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            code = proc.wait(timeout=timeout)
            error = ""
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code, error = -9, f"timed out after {timeout:g} s (trial_timeout)"
        except BaseException:  # Ctrl-C: stop the trial too, then let the sweep stop
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code != 0:
        tail = stderr_tail(run_dir / "stderr.log")
        error = "\n".join(x for x in (error, tail) if x) or f"exit code {code}"
    return code, error


def stderr_tail(path: Path, lines: int = STDERR_LINES) -> str:
    """The last non-empty lines of a log (progress-bar carriage returns collapsed)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    rows = [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    return "\n".join([r for r in rows if r.strip()][-lines:])[-3000:]


def read_metrics(run_dir: Path) -> dict[str, float]:
    """metrics.json["metrics"] plus metrics.json["fit"] as fit/<key>."""
    report = json.loads((run_dir / "metrics.json").read_text())
    flat = {k: v for k, v in (report.get("metrics") or {}).items() if isinstance(v, (int, float))}
    flat.update({f"fit/{k}": v for k, v in (report.get("fit") or {}).items() if isinstance(v, (int, float))})
    return flat


def load_records(path: Path) -> list[dict[str, Any]]:
    """Finished trials from trials.jsonl, by number (a torn last line from a kill is skipped)."""
    if not path.is_file():
        return []
    records: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            records[int(rec["number"])] = rec
        except (ValueError, KeyError, TypeError):
            print(
                f"adx sweep: {path}:{i} is not a trial record; ignored (the trial will run again)",
                file=sys.stderr,
            )
    return [records[n] for n in sorted(records)]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def _lock(sweep_dir: Path):
    path = sweep_dir / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, PermissionError, OSError):
                path.unlink(missing_ok=True)  # stale: its sweep is gone
                continue
            raise SweepError(f"another adx sweep (pid {pid}) is running in {sweep_dir}") from None
    else:
        raise SweepError(f"cannot lock {path}")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return (
            f"{value:.4g}"
            if abs(value) < 1e-3 or abs(value) >= 1e4
            else f"{value:.4f}".rstrip("0").rstrip(".")
        )
    return cli_value(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------------------------------
# results


def sorted_records(records: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """Ok trials best first (ties by number), failed trials last by number."""
    sign = -1.0 if direction == "maximize" else 1.0
    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: (sign * r["value"], r["number"]))
    return ok + sorted((r for r in records if r["status"] != "ok"), key=lambda r: r["number"])


def write_results(
    sweep_dir: Path, spec: SweepSpec, records: list[dict[str, Any]], n_trials: int, fit_cmd: list[str]
) -> None:
    """Rewrite results.csv and results.md from the records."""
    rows = sorted_records(records, spec.direction)
    keys = list(spec.params)
    metric_keys: list[str] = []
    for r in rows:
        metric_keys += [k for k in r.get("metrics", {}) if k not in metric_keys and k != spec.metric]
    header = ["rank", "trial", "status", spec.metric, *keys, *metric_keys, "seconds", "run_dir", "error"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for rank, r in enumerate(rows, 1):
        metrics = r.get("metrics", {})
        writer.writerow(
            [
                rank if r["status"] == "ok" else "",
                f"t{r['number']:03d}",
                r["status"],
                "" if r.get("value") is None else r["value"],
                *[cli_value(r["params"].get(k)) for k in keys],
                *[metrics.get(k, "") for k in metric_keys],
                r.get("seconds", ""),
                r.get("run_dir", ""),
                r.get("error") or "",
            ]
        )
    _write_atomic(sweep_dir / "results.csv", buf.getvalue())

    n_ok = sum(r["status"] == "ok" for r in records)
    names = _short_names(keys)
    lines = [
        f"# Sweep {spec.path.stem}",
        "",
        f"{spec.sampler} sampler (seed {spec.seed}), {spec.direction} `{spec.metric}`: "
        f"{len(records)}/{n_trials} trials finished, {n_ok} ok, {len(records) - n_ok} failed. "
        "Run folders are relative to this folder.",
        "",
    ]
    best = rows[0] if rows and rows[0]["status"] == "ok" else None
    if best:
        params = [a for k in keys for a in (f"--{k}", cli_value(best["params"][k]))]
        lines += [
            f"Best: t{best['number']:03d}, {spec.metric} = {_fmt(best['value'])}. To run it again:",
            "",
            "```bash",
            shlex.join(["adx", *fit_cmd, *params]),
            "```",
            "",
        ]
    cols = [
        "rank",
        "trial",
        spec.metric,
        *[names[k] for k in keys],
        "status",
        "seconds",
        "run folder",
        "error",
    ]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rank, r in enumerate(rows, 1):
        error = (r.get("error") or "").strip().splitlines()
        cells = [
            str(rank) if r["status"] == "ok" else "",
            f"t{r['number']:03d}",
            "" if r.get("value") is None else _fmt(r["value"]),
            *[_fmt(r["params"].get(k)) for k in keys],
            r["status"],
            f"{r.get('seconds', 0):.1f}",
            f"`{r.get('run_dir', '')}`",
            (error[-1][:160] if error else ""),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    _write_atomic(sweep_dir / "results.md", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------
# the sweep


Runner = Callable[[list[str], Path, "float | None"], "tuple[int, str]"]


def run_sweep(args: SweepArgs, runner: Runner | None = None) -> Path:
    """Run (or resume) a sweep; returns its folder."""
    runner = runner or run_command
    spec = load_spec(args.sweep)
    optuna = _optuna()
    make_sampler(optuna, spec, 0)  # sampler_args checked before any work
    configs = [*spec.configs, *args.configs]
    if not configs:
        raise SweepError("no base config: pass --config FILE or set config: in the sweep file")
    swept = {_norm(k) for k in spec.params}
    for arg in args.passthrough:
        if arg.startswith("--") and _norm(arg) in swept:
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
        old = json.loads(state_path.read_text())
        changed = [
            k
            for k in ("sampler", "seed", "metric", "direction", "params", "sampler_args")
            if old["spec"].get(k) != identity["spec"][k]
        ]
        changed += [f"config {k}" for k in _config_diff(old.get("base", {}), base)]
        if changed:
            raise SweepError(
                f"{sweep_dir} holds a different sweep (changed: {', '.join(changed[:8])}); "
                "resume it with the same sweep file and configs, or start a new one with --out DIR"
            )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    fit_cmd = ["fit", *base_args]
    with _lock(sweep_dir):
        if not state_path.is_file():
            _write_atomic(
                state_path,
                json.dumps(
                    {
                        **identity,
                        "configs": configs,
                        "fit_args": fit_cmd,
                        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    },
                    indent=2,
                    default=str,
                ),
            )
        trials_path = sweep_dir / TRIALS_FILE
        records = load_records(trials_path)
        if args.retry_failed:
            failed = [r for r in records if r["status"] != "ok"]
            if failed:
                for r in failed:
                    _append(sweep_dir / RETRIED_FILE, r)
                records = [r for r in records if r["status"] == "ok"]
                _write_atomic(trials_path, "".join(json.dumps(r, default=str) + "\n" for r in records))
                print(f"adx sweep: retrying {len(failed)} failed trial(s); old records in {RETRIED_FILE}")
        return _run_trials(optuna, spec, sweep_dir, records, n_trials, fit_cmd, runner)


def _replay(optuna: Any, study: Any, spec: SweepSpec, records: list[dict[str, Any]]) -> None:
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


def _run_trials(
    optuna: Any,
    spec: SweepSpec,
    sweep_dir: Path,
    records: list[dict[str, Any]],
    n_trials: int,
    fit_cmd: list[str],
    runner: Runner,
) -> Path:
    n_trials = max(n_trials, len(records))  # a smaller --n_trials than already run stops here
    study = optuna.create_study(direction=spec.direction)
    _replay(optuna, study, spec, records)
    trials_path = sweep_dir / TRIALS_FILE
    names = _short_names(list(spec.params))
    if records:
        n_ok = sum(r["status"] == "ok" for r in records)
        print(
            f"adx sweep: resuming {sweep_dir}: {len(records)} of {n_trials} trials finished "
            f"({n_ok} ok, {len(records) - n_ok} failed); they are not run again"
        )
    else:
        print(f"adx sweep: {spec.sampler} sweep of {n_trials} trials in {sweep_dir}")
    write_results(sweep_dir, spec, records, n_trials, fit_cmd)
    durations: list[float] = []
    holder: dict[str, Any] = {}

    def objective(trial: Any) -> float:
        params = {key: p.suggest(trial) for key, p in spec.params.items()}
        run_dir = _new_trial_dir(sweep_dir, trial.number)
        values = [a for k, v in params.items() for a in (f"--{k}", cli_value(v))]
        cmd = [sys.executable, "-m", "adx.cli", *fit_cmd, *values, "--trainer.default_root_dir", str(run_dir)]
        t0 = time.perf_counter()
        try:
            code, error = runner(cmd, run_dir, spec.trial_timeout)
        except OSError as exc:
            code, error = -1, f"could not start the trial: {exc}"
        seconds = time.perf_counter() - t0
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
        _append(trials_path, record)
        records.append(record)
        write_results(sweep_dir, spec, records, n_trials, fit_cmd)
        durations.append(record["seconds"])
        left = n_trials - len(records)
        eta = f", ETA {_duration(left * sum(durations) / len(durations))}" if left else ""
        shown = " ".join(f"{names[k]}={_fmt(v)}" for k, v in record["params"].items())
        if record["status"] == "ok":
            outcome = f"{spec.metric} {_fmt(record['value'])}"
        else:
            lines = (record["error"] or "failed").strip().splitlines()
            outcome = f"FAILED: {lines[-1][:200] if lines else 'failed'}"
        print(
            f"adx sweep: [{len(records)}/{n_trials}] t{record['number']:03d} {shown} -> {outcome} "
            f"({_duration(record['seconds'])}{eta})",
            flush=True,
        )
    _summary(sweep_dir, spec, records)
    return sweep_dir


def _new_trial_dir(sweep_dir: Path, number: int) -> Path:
    from adx.cli import new_run_dir

    return new_run_dir(sweep_dir / "trials", f"t{number:03d}")


def _summary(sweep_dir: Path, spec: SweepSpec, records: list[dict[str, Any]]) -> None:
    rows = sorted_records(records, spec.direction)
    n_ok = sum(r["status"] == "ok" for r in records)
    names = _short_names(list(spec.params))
    print(f"adx sweep: done, {n_ok} ok, {len(records) - n_ok} failed; best first:")
    for r in rows[:5]:
        value = _fmt(r["value"]) if r["status"] == "ok" else "failed"
        shown = " ".join(f"{names[k]}={_fmt(v)}" for k, v in r["params"].items())
        print(f"  t{r['number']:03d}  {spec.metric} {value:>8}  {shown}  {r['run_dir']}")
    print(f"adx sweep: results in {sweep_dir / 'results.md'} and results.csv")
    if records and not n_ok:
        raise SystemExit(
            f"adx sweep: all {len(records)} trials failed; see the errors in {sweep_dir / 'results.md'}"
        )


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> None:
    """Entry point of ``adx sweep`` (``adx.cli.main`` dispatches here)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run_sweep(args, runner)


if __name__ == "__main__":
    main()
