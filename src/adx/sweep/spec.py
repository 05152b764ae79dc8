"""The sweep file: parsing and checking it into a ``SweepSpec`` of ``Param``s, and the ranking metric."""

from __future__ import annotations

import difflib
import json
import math
import os
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
# What a sweep ranks by when its file names no metric: the validation loss of trained methods, computed
# on held-out normal images (no test labels). Test metrics must be named with the test/ prefix.
DEFAULT_METRIC, DEFAULT_DIRECTION = "fit/val/loss", "minimize"
METRIC_PREFIXES = ("test/", "fit/")


class SweepError(SystemExit):
    """A problem with the sweep file or command line, reported before any trial runs."""

    def __init__(self, message: str) -> None:
        super().__init__(f"adx sweep: {message}")


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


def norm_key(key: str) -> str:
    """Dotted key without ``init_args`` parts and dashes: model.init_args.k and model.k compare equal."""
    return ".".join(p for p in key.lstrip("-").split("=")[0].split(".") if p != "init_args")


# ----------------------------------------------------------------------------------------------------
# the ranking metric


def metric_split(metric: str) -> str:
    """Where a metric's value is computed: ``test``, ``validation`` or ``training``."""
    if metric.startswith("test/"):
        return "test"
    return "validation" if metric.startswith("fit/val/") else "training"


def metric_source(metric: str) -> str:
    """The metrics.json entry a metric name reads, e.g. ``metrics.json["metrics"]["image_AUROC"]``."""
    group, key = ("metrics", metric[5:]) if metric.startswith("test/") else ("fit", metric[4:])
    return f'metrics.json["{group}"]["{key}"]'


def legacy_metric(name: str) -> str:
    """A metric name as sweeps before the test/ prefix wrote it (``image_AUROC``) in today's form."""
    return name if name.startswith(METRIC_PREFIXES) else f"test/{name}"


def _metric_and_direction(raw: dict[str, Any]) -> tuple[str, str, bool]:
    """(metric, direction, whether the metric is the default) of a sweep file."""
    metric, direction = raw.get("metric"), raw.get("direction")
    if metric is None:
        metric, default = DEFAULT_METRIC, True
    else:
        default = False
        if not isinstance(metric, str) or metric in ("", *METRIC_PREFIXES):
            raise SweepError(
                'metric must be fit/<key> of metrics.json["fit"] (e.g. fit/val/loss) or test/<key> of '
                f'metrics.json["metrics"] (e.g. test/image_AUROC), got {metric!r}'
            )
        if metric.startswith(("val/", "train/")):
            raise SweepError(f"metric {metric}: values logged during fit are named fit/{metric}")
        if not metric.startswith(METRIC_PREFIXES):
            raise SweepError(
                f'metric {metric} is a test-set metric (metrics.json["metrics"], computed with the test '
                "labels): ranking trials by it chooses hyperparameters on the test set. Rank by a "
                f"validation metric (without metric: the sweep ranks by {DEFAULT_METRIC}), or name the "
                f"test metric explicitly as metric: test/{metric} (results.md then warns that the ranking "
                "used test labels)"
            )
        if direction is None and metric.startswith("fit/"):
            raise SweepError(f"metric {metric}: say direction: minimize or direction: maximize")
    direction = direction or (DEFAULT_DIRECTION if default else "maximize")
    if direction not in ("maximize", "minimize"):
        raise SweepError(f"direction must be maximize or minimize, got {direction!r}")
    return metric, direction, default


# ----------------------------------------------------------------------------------------------------
# params


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
            return cls._categorical(key, value)
        if isinstance(value, dict):
            return cls._range(key, value)
        raise SweepError(
            f"params.{key}: {value!r} is a single value; give a list of values ([{cli_value(value)}, ...]) "
            f"or a range ({{low: .., high: ..}}); fixed values belong under overrides:"
        )

    @classmethod
    def _categorical(cls, key: str, value: list[Any]) -> Param:
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

    @classmethod
    def _range(cls, key: str, value: dict[str, Any]) -> Param:
        unknown = [k for k in value if k not in RANGE_KEYS]
        if unknown:
            raise SweepError(
                f"params.{key}: unknown range key(s) {unknown}; a range takes {list(RANGE_KEYS)}, "
                "a list gives categorical values"
            )
        if "low" not in value or "high" not in value:
            raise SweepError(f"params.{key}: a range needs both low and high, e.g. {{low: 1, high: 9}}")
        low, high = _number(value["low"], f"params.{key}.low"), _number(value["high"], f"params.{key}.high")
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


# ----------------------------------------------------------------------------------------------------
# the sweep file


@dataclass
class SweepSpec:
    """A checked sweep file."""

    path: Path
    sampler: str = "grid"
    n_trials: int | None = None
    seed: int = 0
    metric: str = DEFAULT_METRIC
    direction: str = DEFAULT_DIRECTION
    metric_is_default: bool = True  # no metric: in the file
    params: dict[str, Param] = field(default_factory=dict)
    configs: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    sampler_args: dict[str, Any] = field(default_factory=dict)
    trial_timeout: float | None = None

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.choices) for p in self.params.values())

    @property
    def metric_split(self) -> str:
        """``test``, ``validation`` or ``training``: where the ranking metric is computed."""
        return metric_split(self.metric)

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
    spec.metric, spec.direction, spec.metric_is_default = _metric_and_direction(raw)
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
    clash = [k for k in overrides if norm_key(k) in {norm_key(p) for p in spec.params}]
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
