"""results.csv, results.md and the printed summary: trials ranked by the metric, failed trials last."""

from __future__ import annotations

import csv
import io
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adx.sweep.runner import write_atomic
from adx.sweep.spec import SweepSpec, cli_value, metric_source, metric_split

TEST_WARNING = (
    "the hyperparameters are chosen with the test labels, so the best value is optimistic and is not a "
    "held-out result; confirm the chosen setting on images the sweep did not use before reporting it."
)
SPLIT_NOTES = {
    "test": "computed with the test labels",
    "validation": "the final epoch's value on the validation images; no test labels are used",
    "training": "the final epoch's value on the training images; no test labels are used",
}


def metric_lines(metric: str) -> list[str]:
    """The lines of results.md that say what the trials are ranked by, and a warning for test metrics."""
    split = metric_split(metric)
    lines = [
        f"Ranked by `{metric}` ({metric_source(metric)}), a **{split}** metric: {SPLIT_NOTES[split]}.",
        "",
    ]
    if split == "test":
        lines += [f"> **Warning:** ranked by a test-set metric: {TEST_WARNING}", ""]
    return lines


def metric_notice(metric: str) -> str | None:
    """The line printed when a sweep starts that ranks by a test metric."""
    if metric_split(metric) != "test":
        return None
    return f"adx sweep: WARNING: ranking by {metric}, a test-set metric: {TEST_WARNING}"


def sorted_records(records: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """Ok trials best first (ties by number), failed trials last by number."""
    sign = -1.0 if direction == "maximize" else 1.0
    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: (sign * r["value"], r["number"]))
    return ok + sorted((r for r in records if r["status"] != "ok"), key=lambda r: r["number"])


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last part of each dotted key, or the whole key where two last parts are the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return (
            f"{value:.4g}"
            if abs(value) < 1e-3 or abs(value) >= 1e4
            else f"{value:.4f}".rstrip("0").rstrip(".")
        )
    return cli_value(value)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


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
    write_atomic(sweep_dir / "results.csv", buf.getvalue())

    n_ok = sum(r["status"] == "ok" for r in records)
    names = short_names(keys)
    lines = [
        f"# Sweep {spec.path.stem}",
        "",
        f"{spec.sampler} sampler (seed {spec.seed}), {spec.direction} `{spec.metric}`: "
        f"{len(records)}/{n_trials} trials finished, {n_ok} ok, {len(records) - n_ok} failed. "
        "Run folders are relative to this folder.",
        "",
        *metric_lines(spec.metric),
    ]
    best = rows[0] if rows and rows[0]["status"] == "ok" else None
    if best:
        params = [a for k in keys for a in (f"--{k}", cli_value(best["params"][k]))]
        lines += [
            f"Best: t{best['number']:03d}, {spec.metric} = {fmt(best['value'])}. To run it again:",
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
            "" if r.get("value") is None else fmt(r["value"]),
            *[fmt(r["params"].get(k)) for k in keys],
            r["status"],
            f"{r.get('seconds', 0):.1f}",
            f"`{r.get('run_dir', '')}`",
            (error[-1][:160] if error else ""),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    write_atomic(sweep_dir / "results.md", "\n".join(lines) + "\n")


def print_summary(sweep_dir: Path, spec: SweepSpec, records: list[dict[str, Any]]) -> None:
    """The five best trials on stdout; exits with an error when every trial failed."""
    rows = sorted_records(records, spec.direction)
    n_ok = sum(r["status"] == "ok" for r in records)
    names = short_names(list(spec.params))
    print(
        f"adx sweep: done, {n_ok} ok, {len(records) - n_ok} failed; best first by {spec.metric} "
        f"({spec.metric_split} metric):"
    )
    for r in rows[:5]:
        value = fmt(r["value"]) if r["status"] == "ok" else "failed"
        shown = " ".join(f"{names[k]}={fmt(v)}" for k, v in r["params"].items())
        print(f"  t{r['number']:03d}  {spec.metric} {value:>8}  {shown}  {r['run_dir']}")
    print(f"adx sweep: results in {sweep_dir / 'results.md'} and results.csv")
    if records and not n_ok:
        raise SystemExit(
            f"adx sweep: all {len(records)} trials failed; see the errors in {sweep_dir / 'results.md'}"
        )
