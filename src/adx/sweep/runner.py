"""One trial as an ``adx fit`` subprocess, its metrics, and the sweep folder's files: records and lock."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from adx.runs import new_run_dir
from adx.sweep.spec import SweepError, legacy_metric

TRIALS_FILE = "trials.jsonl"
RETRIED_FILE = "trials.retried.jsonl"
STATE_FILE = "sweep.json"
LOCK_FILE = "sweep.lock"
STDERR_LINES = 15

# runs one trial's command in its run folder with a timeout; returns (exit code, error text)
Runner = Callable[[list[str], Path, "float | None"], "tuple[int, str]"]


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


def new_trial_dir(sweep_dir: Path, number: int) -> Path:
    """A fresh run folder ``<sweep>/trials/t<NNN>/v<N>`` (an interrupted trial's folder is left as it was)."""
    return new_run_dir(sweep_dir / "trials", f"t{number:03d}")


def read_metrics(run_dir: Path) -> dict[str, float]:
    """metrics.json["metrics"] as test/<key> plus metrics.json["fit"] as fit/<key>."""
    report = json.loads((run_dir / "metrics.json").read_text())
    flat = {f"test/{k}": v for k, v in (report.get("metrics") or {}).items() if isinstance(v, (int, float))}
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
    for rec in records.values():  # sweeps made before test metrics took the test/ prefix
        if isinstance(rec.get("metrics"), dict):
            rec["metrics"] = {legacy_metric(k): v for k, v in rec["metrics"].items()}
    return [records[n] for n in sorted(records)]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold ``sweep.lock`` (with this pid) while the sweep runs; a lock of a dead process is taken over."""
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
