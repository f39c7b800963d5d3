"""Goodput under overload (issue 8, item 2): accepted requests/s at a peak concurrency and at
4x that concurrency against one worker with the default queue (CONCEPTGUARD_QUEUE_SIZE 512),
the share of 503s, and whether every 503 carries Retry-After.

Target: the accepted throughput at 4x the peak concurrency stays >= 80% of the peak's. The
service admits a request before reading its body (a request that will be shed is refused
before any decoding) and runs inference on its own thread, apart from decoding.

    .venv/bin/python benchmarks/overload.py [--seconds 8] [--peak 256] [--factor 4]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import signal
import subprocess
import time
from pathlib import Path

from _common import DEMO_BANK, REPO, emit, machine
from http_load import free_port, start_server


def _client_proc(url: str, png: bytes, concurrency: int, seconds: float, start_at: float,
                 out: mp.Queue) -> None:
    import httpx

    async def run() -> dict[str, int]:
        counts = {"ok": 0, "shed": 0, "shed_without_retry_after": 0, "errors": 0}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            while time.time() < start_at:
                await asyncio.sleep(0.005)
            stop = time.perf_counter() + seconds

            async def worker() -> None:
                while time.perf_counter() < stop:
                    try:
                        r = await client.post(url, files={"file": ("x.png", png, "image/png")})
                    except httpx.HTTPError:
                        counts["errors"] += 1
                        continue
                    if r.status_code == 200:
                        counts["ok"] += 1
                    elif r.status_code == 503:
                        counts["shed"] += 1
                        if "retry-after" not in r.headers:
                            counts["shed_without_retry_after"] += 1
                    else:
                        counts["errors"] += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return counts

    out.put(asyncio.run(run()))


def load(url: str, png: bytes, concurrency: int, seconds: float, procs_n: int) -> dict:
    per = [concurrency // procs_n + (i < concurrency % procs_n) for i in range(procs_n)]
    q: mp.Queue = mp.Queue()
    start_at = time.time() + 1.0
    procs = [mp.Process(target=_client_proc, args=(url, png, c, seconds, start_at, q))
             for c in per]
    for p in procs:
        p.start()
    parts = [q.get(timeout=seconds + 180) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    total = {k: sum(p[k] for p in parts) for k in parts[0]}
    total["accepted_per_s"] = round(total["ok"] / seconds, 1)
    total["concurrency"] = concurrency
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, default=DEMO_BANK)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--peak", type=int, default=256)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--client-processes", type=int, default=4)
    ap.add_argument("--queue-size", type=int, default=512)
    args = ap.parse_args()
    png = (REPO / "examples" / "coat.png").read_bytes()
    port = free_port()
    proc = start_server(args.bank, port, 32, queue_size=args.queue_size)
    try:
        url = f"http://127.0.0.1:{port}/v1/classify"
        load(url, png, 8, 2.0, 1)  # warm-up
        peak = load(url, png, args.peak, args.seconds, args.client_processes)
        over = load(url, png, args.peak * args.factor, args.seconds, args.client_processes)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    ratio = round(over["accepted_per_s"] / peak["accepted_per_s"], 3) \
        if peak["accepted_per_s"] else None
    emit("overload", {**machine(), "seconds_per_run": args.seconds, "peak": peak,
                      "overload": over, "goodput_ratio": ratio, "target": ">= 0.80",
                      "every_503_has_retry_after": (peak["shed_without_retry_after"]
                                                    + over["shed_without_retry_after"]) == 0})


if __name__ == "__main__":
    main()
