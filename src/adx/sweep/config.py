"""The base config of a sweep: resolved and checked by adx's own parser before any trial runs.

``adx.cli`` is imported inside ``parse_config`` only, when a sweep is checked: ``import adx.sweep`` does not
import ``adx.cli`` (nor torch and Lightning), and ``adx.cli`` imports this package only inside ``main()``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import io
import warnings
from typing import Any

import yaml

from adx.sweep.spec import DEFAULT_METRIC, SweepError, SweepSpec, cli_value, norm_key

# keys that do not change results: a resumed sweep may differ from the first run in these
IDENTITY_IGNORED = (
    "trainer.enable_progress_bar",
    "data.init_args.num_workers",
    "model.init_args.progress",
    "heatmaps.",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted.key: value}``."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def parse_config(args: list[str]) -> tuple[dict[str, Any] | None, str]:
    """Parse ``adx fit`` arguments in-process with --print_config: (resolved config, parser error)."""
    from adx.cli import AdxCLI  # here, not at the top: see the module docstring

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
        raise SweepError(f"the base config and overrides do not parse:\n{indent(error)}")
    if spec.metric_is_default:
        check_default_metric(base)
    known = set(flatten(base)) | {norm_key(k) for k in flatten(base)}
    for param in spec.params.values():
        for value in param.probe_values():
            _, error = parse_config([*base_args, f"--{param.key}", cli_value(value)])
            if error:
                close = difflib.get_close_matches(param.key, sorted(known), n=3, cutoff=0.75)
                hint = f"\ndid you mean: {', '.join(close)}?" if close and param.key not in known else ""
                raise SweepError(
                    f"params.{param.key} = {cli_value(value)} is refused by the base config:\n"
                    f"{indent(error)}{hint}"
                )
    return base


def check_default_metric(base: dict[str, Any]) -> None:
    """The default metric (validation loss) exists for trained methods only: refuse it for the others."""
    from adx.models import TrainedModule

    model = base.get("model")
    class_path = model.get("class_path") if isinstance(model, dict) else None
    if not isinstance(class_path, str):
        return
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return  # the parser accepted it; a trial will say what is wrong
    if isinstance(cls, type) and not issubclass(cls, TrainedModule):
        raise SweepError(
            f"the sweep file names no metric, and the default {DEFAULT_METRIC} (the loss on the normal "
            f"validation images) is logged only by methods trained by gradient descent; {name} is not one "
            "and logs no validation value to rank its trials by. Name the metric: "
            "metric: test/image_AUROC ranks by the test labels (results.md then says so), or "
            "metric: fit/val/<key> with direction: if your model logs one"
        )


def indent(text: str, lines: int = 14) -> str:
    return "\n".join("  " + line for line in text.strip().splitlines()[:lines])


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Resolved config keys that differ between two sweeps, except those that do not change results."""
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in keys if not any(k == i or k.startswith(i) for i in IDENTITY_IGNORED)]
