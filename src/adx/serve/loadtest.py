"""Run ``adx serve`` as a separate process and load it with concurrent clients (tests and tools/bench_serve.py).

:func:`running_server` starts ``python -m adx.serve`` on a free port of 127.0.0.1 and waits for
``/api/health``; :func:`hammer` sends N predict requests from C concurrent clients (one thread and one
keep-alive HTTP connection each) and returns the latency percentiles, throughput and any failures.
Needs httpx (``adx[dev]``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(
    args: Sequence[str], timeout: float = 60.0, log: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Start ``python -m adx.serve ARGS --port <free>`` on 127.0.0.1, yield its base URL, stop it after.

    The server's stderr goes to ``log`` (or is discarded); a server that exits early raises RuntimeError with
    the end of that log.
    """
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "adx.serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(log, "wb")) if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdout=sink, stderr=sink, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
                    raise RuntimeError(
                        f"adx serve exited with code {proc.returncode}: {' '.join(cmd)}\n{tail}"
                    )
                try:
                    if httpx.get(url + "/api/health", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"adx serve did not answer /api/health within {timeout:.0f} s")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def hammer(
    url: str,
    files: Sequence[tuple[str, bytes]],
    requests: int = 200,
    concurrency: int = 20,
    params: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """POST ``requests`` images (cycling through ``files``) to ``url``/api/predict from ``concurrency`` clients.

    Returns ``{"requests", "concurrency", "ok", "failures" (first 10), "p50_ms", "p95_ms", "max_ms", "mean_ms",
    "throughput_rps", "wall_s"}``; latency is per request, seen by the client (upload, decode, model, JSON).
    """
    import httpx

    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    failures: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= requests:
                    return
                name, data = files[i % len(files)]
                t0 = time.perf_counter()
                try:
                    resp = http.post(
                        "/api/predict", params=params or {"map": "png"}, files={"file": (name, data)}
                    )
                    problem = (
                        None
                        if resp.status_code == 200
                        else f"{name}: HTTP {resp.status_code} {resp.text[:200]}"
                    )
                except httpx.HTTPError as exc:
                    problem = f"{name}: {type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                    if problem:
                        failures.append(problem)

    t_start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    ms = np.array(latencies) * 1000.0
    return {
        "requests": requests,
        "concurrency": concurrency,
        "ok": requests - len(failures),
        "failures": failures[:10],
        "n_failures": len(failures),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "max_ms": round(float(ms.max()), 1),
        "mean_ms": round(float(ms.mean()), 1),
        "throughput_rps": round(requests / wall, 2),
        "wall_s": round(wall, 2),
    }
