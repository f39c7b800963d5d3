"""Goodput under a client that ignores Retry-After (issue 22): wrk re-sends at once on every
answer, 503 or not. One ``conceptguard serve`` worker (demo bank, default queue of 512)
pinned to CPU 1 (``taskset -c 1``), wrk pinned to CPU 0 (``taskset -c 0 wrk -t1``), each
request ``POST /v1/classify`` with a demo PNG as the raw body (``examples/coat.png``,
``Content-Type: image/png``). Per round: the peak (``--peak-connections``, 64) and then the
abusive load (``--connections``, 1000), on the same server.

Goodput is answers with a monitor result (2xx) per second: wrk's requests minus its non-2xx
responses over the run's duration. The ratio is the best round at 1000 connections over the
best round at the peak; the medians, and each round's ratio to the same round's peak (the
worst of them too), show the spread. The machine is shared: the 1-minute load average is
recorded before and after each wrk run.

    .venv/bin/python benchmarks/goodput.py [--seconds 8] [--rounds 3]
        [--env CONCEPTGUARD_ADMISSION_HOLD_S=0]   # extra server settings (0: no holding)

Needs ``wrk`` (Debian: ``apt-get install wrk``) and ``taskset``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from _common import (
    DEMO_BANK,
    REPO,
    WRK_POST_LUA,
    emit,
    free_port,
    machine,
    serve_pinned,
    stop_server,
)

IMAGE = REPO / "examples" / "coat.png"


def rss_mib(pid: int) -> dict[str, float]:
    """The server process's resident memory now and at its peak (Linux /proc)."""
    text = Path(f"/proc/{pid}/status").read_text()
    kb = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
    return {"rss_mib": round(int(kb["VmRSS"]) / 1024, 1),
            "peak_rss_mib": round(int(kb["VmHWM"]) / 1024, 1)}


def parse_wrk(out: str) -> dict:
    """Requests, non-2xx, socket errors and goodput from wrk's summary."""
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    if m is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    requests = int(m.group(1))
    seconds = float(m.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    rejected = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    return {"requests": requests, "seconds": round(seconds, 3), "non_2xx": rejected,
            "answers_per_s": round((requests - rejected) / seconds, 1),
            "requests_per_s": round(requests / seconds, 1),
            "socket_errors": dict(zip(("connect", "read", "write", "timeout"),
                                      map(int, errors.groups()), strict=True)) if errors else {},
            "p50": lat.get("50"), "p99": lat.get("99")}


def wrk(url: str, lua: Path, connections: int, seconds: int, cpu: str) -> dict:
    before = os.getloadavg()[0]
    out = subprocess.run(["taskset", "-c", cpu, "wrk", "-t1", f"-c{connections}",
                          f"-d{seconds}s", "--timeout", "30s", "--latency", "-s", str(lua),
                          url], capture_output=True, text=True, check=True).stdout
    return {"connections": connections, **parse_wrk(out),
            "load_avg_1m": [round(before, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, default=DEMO_BANK)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peak-connections", type=int, default=64)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--server-cpu", default="1")
    ap.add_argument("--wrk-cpu", default="0")
    ap.add_argument("--env", nargs="*", default=[], help="KEY=VALUE server settings")
    args = ap.parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("goodput: needs wrk and taskset on PATH")
    bad = [kv for kv in args.env if "=" not in kv]
    if bad:
        sys.exit(f"goodput: --env takes KEY=VALUE, got {bad[0]!r}")
    extra = dict(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lua = folder / "post.lua"
        lua.write_text(WRK_POST_LUA.format(body=IMAGE, ctype="image/png"))
        port = free_port()
        proc = serve_pinned(args.bank, port, folder / "server.log", extra, args.server_cpu)
        url = f"http://127.0.0.1:{port}/v1/classify"
        peak: list[dict] = []
        abusive: list[dict] = []
        try:
            wrk(url, lua, 8, 2, args.wrk_cpu)  # warm-up
            for _ in range(args.rounds):
                peak.append(wrk(url, lua, args.peak_connections, args.seconds, args.wrk_cpu))
                abusive.append(wrk(url, lua, args.connections, args.seconds, args.wrk_cpu))
                print(f"peak {peak[-1]['answers_per_s']}/s, c={args.connections} "
                      f"{abusive[-1]['answers_per_s']}/s ({abusive[-1]['non_2xx']} non-2xx), "
                      f"load {abusive[-1]['load_avg_1m']}", file=sys.stderr)
            memory = rss_mib(proc.pid)
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        finally:
            stop_server(proc)
    shed = sum(float(v) for v in re.findall(
        r"^conceptguard_queue_full_total(?:\{[^}]*\})? ([\d.e+]+)", metrics, re.M))
    best_peak = max(r["answers_per_s"] for r in peak)
    best = max(r["answers_per_s"] for r in abusive)
    med_peak = statistics.median(r["answers_per_s"] for r in peak)
    med = statistics.median(r["answers_per_s"] for r in abusive)
    emit("goodput", {
        **machine(), "server_env": extra, "seconds": args.seconds, "rounds": args.rounds,
        "image": str(IMAGE.relative_to(REPO)),
        "peak_connections": args.peak_connections, "connections": args.connections,
        "peak_answers_per_s": best_peak, "abusive_answers_per_s": best,
        "ratio": round(best / best_peak, 3),
        "median_peak_answers_per_s": med_peak, "median_abusive_answers_per_s": med,
        "median_ratio": round(med / med_peak, 3),
        # each round's 1000 connections over the same round's peak (minutes apart, so the
        # shared machine's load is about the same for both)
        "round_ratios": [round(a["answers_per_s"] / p["answers_per_s"], 3)
                         for p, a in zip(peak, abusive, strict=True)],
        "worst_round_ratio": round(min(a["answers_per_s"] / p["answers_per_s"]
                                       for p, a in zip(peak, abusive, strict=True)), 3),
        "worst_abusive_answers_per_s": min(r["answers_per_s"] for r in abusive),
        "abusive_non_2xx": [r["non_2xx"] for r in abusive],
        "queue_full_total": shed,
        "load_avg_1m": [r["load_avg_1m"] for r in abusive],
        "load_avg_range": [min(v for r in peak + abusive for v in r["load_avg_1m"]),
                           max(v for r in peak + abusive for v in r["load_avg_1m"])],
        "server_memory": memory, "peak_runs": peak, "abusive_runs": abusive})


if __name__ == "__main__":
    main()
