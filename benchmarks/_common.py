"""Shared helpers of the benchmark scripts: timing loops and the demo inputs."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conceptguard.threads import single_threaded_blas

single_threaded_blas()

REPO = Path(__file__).resolve().parents[1]
DEMO_BANK = REPO / "banks" / "demo"


def machine() -> dict:
    import os

    return {"machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}


def test_images(n: int) -> np.ndarray:
    """``n`` Fashion-MNIST test images as float32 NCHW in [0, 1] (repeated if needed)."""
    from conceptguard.classifier.inference import to_tensor
    from conceptguard.data import DataSpec, load_source

    _, test = load_source(DataSpec())
    idx = np.arange(n) % len(test)
    return to_tensor(test.images[idx]).numpy()


def throughput(fn: Callable[[], object], items_per_call: int, min_seconds: float = 2.0,
               warmup: int = 3) -> dict:
    """Call ``fn`` repeatedly for at least ``min_seconds``; items/s and per-call quantiles."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    arr = np.array(times)
    return {"items_per_s": items_per_call * len(arr) / arr.sum(),
            "p50_ms": float(np.percentile(arr, 50) * 1e3),
            "p99_ms": float(np.percentile(arr, 99) * 1e3), "calls": len(arr)}


def interleaved(fns: dict[str, Callable[[], object]], items_per_call: int, rounds: int = 5,
                seconds_per_round: float = 0.6) -> dict[str, dict]:
    """Alternate between the candidates in short rounds so that drifts in machine load
    hit all of them alike; report the median round's items/s for each."""
    for fn in fns.values():
        fn()
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(throughput(fn, items_per_call, seconds_per_round,
                                        warmup=1)["items_per_s"])
    return {k: {"items_per_s": float(np.median(v)), "rounds": v} for k, v in per.items()}


def provenance() -> dict:
    """The command that is running (as typed from the repo root) and the UTC date."""
    import datetime
    import os
    import shlex
    import sys

    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    prefix = "PYTHONPATH=. " if os.environ.get("PYTHONPATH") else ""
    command = " ".join([f"{prefix}.venv/bin/python {shown}", *map(shlex.quote, sys.argv[1:])])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return {"command": command, "date": date, "commit": _commit()}


def _commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes to anything but the result
    files), or None outside git."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!benchmarks/results"],  # results are not the code
                               cwd=REPO, text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def emit(name: str, payload: dict) -> None:
    """Print the result as JSON, with the command and date that produced it; with
    ``BENCH_RESULT=benchmarks/results/NAME.json`` also write it there (scripts/docs.py
    fills docs/benchmarks.md's tables from those files)."""
    import os

    text = json.dumps({"benchmark": name, **provenance(), **payload}, indent=2, default=float)
    print(text)
    out = os.environ.get("BENCH_RESULT")
    if out:
        from conceptguard.atomic import atomic_write_text

        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")


WRK_POST_LUA = """
local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "{ctype}"
"""
"""A wrk script that POSTs one file's bytes with a Content-Type (fill ``body``, ``ctype``)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_pinned(bank: Path, port: int, log: Path, extra: dict[str, str], cpu: str,
                 ready_s: float = 120.0) -> subprocess.Popen:
    """``conceptguard serve`` on CPU ``cpu`` (taskset), one inference thread, no CONCEPTGUARD_*
    setting inherited but ``extra`` (applied last); returns once it is ready."""
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCEPTGUARD_")}
    env.update({"CONCEPTGUARD_THREADS": "1", "CONCEPTGUARD_DEVICE": "cpu",
                "CONCEPTGUARD_GRPC_PORT": "0"})
    env.update(extra)
    cmd = ["taskset", "-c", cpu, sys.executable, "-m", "offline.cli", "serve", "--bank",
           str(bank), "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError("server not ready")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after ``timeout`` seconds."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
