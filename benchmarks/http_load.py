"""HTTP load on loopback: requests/s and latency quantiles at concurrency 1, 8, 32, 128,
with batching on (max batch 32) and off (1), one worker; and the in-process ONNX Runtime
throughput at batch 32 as the ceiling. Bounded: each run stops after --seconds or
--max-requests, whichever comes first.

Targets (issue 4): with batching, HTTP throughput at concurrency 32 >= 70% of in-process
ONNX at batch 32, and >= 3x the unbatched service at the same concurrency.

The load comes from several client processes (one asyncio httpx client each), since one
Python client saturates before the server does; they share the machine's cores with it.

    .venv/bin/python benchmarks/http_load.py [--seconds 8] [--concurrency 1 8 32 128]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import DEMO_BANK, REPO, emit, machine, test_images, throughput

from conceptguard.bank import load_bank
from conceptguard.runtime import OnnxRuntime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bank: Path, port: int, max_batch: int,
                 queue_size: int = 4096) -> subprocess.Popen:
    env = {**os.environ, "CONCEPTGUARD_BANK": str(bank),
           "CONCEPTGUARD_MAX_BATCH_SIZE": str(max_batch),
           "CONCEPTGUARD_QUEUE_SIZE": str(queue_size),
           "HF_HUB_OFFLINE": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.app:app", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning",
                             "--no-access-log"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code \
                    == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become ready")


def _client_proc(url: str, png: bytes, concurrency: int, seconds: float, max_requests: int,
                 start_at: float, out: mp.Queue) -> None:
    import httpx

    async def run() -> tuple[list[float], int]:
        lat: list[float] = []
        errors = 0
        sent = 0
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            while time.time() < start_at:
                await asyncio.sleep(0.005)
            stop = time.perf_counter() + seconds

            async def worker() -> None:
                nonlocal errors, sent
                while time.perf_counter() < stop and sent < max_requests:
                    sent += 1
                    t0 = time.perf_counter()
                    try:
                        r = await client.post(url, files={"file": ("x.png", png, "image/png")})
                        ok = r.status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if ok:
                        lat.append(time.perf_counter() - t0)
                    else:
                        errors += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, errors

    lat, errors = asyncio.run(run())
    out.put((lat, errors))


def load(url: str, png: bytes, concurrency: int, seconds: float, max_requests: int) -> dict:
    procs_n = min(4, concurrency)
    per = [concurrency // procs_n + (i < concurrency % procs_n) for i in range(procs_n)]
    q: mp.Queue = mp.Queue()
    start_at = time.time() + 1.0
    procs = [mp.Process(target=_client_proc, args=(url, png, c, seconds,
                                                     max_requests // procs_n, start_at, q))
             for c in per]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    lat = np.concatenate([np.array(r[0]) for r in results]) if results else np.zeros(0)
    errors = sum(r[1] for r in results)
    return {"requests_per_s": round(len(lat) / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50) * 1e3), 2) if len(lat) else None,
            "p95_ms": round(float(np.percentile(lat, 95) * 1e3), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99) * 1e3), 2) if len(lat) else None,
            "ok": len(lat), "errors": errors, "client_processes": procs_n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, default=DEMO_BANK)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--max-requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    args = ap.parse_args()
    png = (REPO / "examples" / "coat.png").read_bytes()
    bank = load_bank(args.bank)
    rt = OnnxRuntime(bank.onnx_path)
    x = test_images(32)
    in_process = throughput(lambda: rt.run(x), 32, 3.0)["items_per_s"]

    results: dict[str, dict] = {}
    for label, max_batch in (("batching_on", 32), ("batching_off", 1)):
        port = free_port()
        proc = start_server(args.bank, port, max_batch)
        try:
            url = f"http://127.0.0.1:{port}/v1/classify"
            load(url, png, 4, 2.0, 2000)  # warm-up
            results[label] = {f"c{c}": load(url, png, c, args.seconds, args.max_requests)
                              for c in args.concurrency}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    on32 = results["batching_on"].get("c32", {}).get("requests_per_s")
    off32 = results["batching_off"].get("c32", {}).get("requests_per_s")
    ratios = {}
    if on32:
        ratios["http_batched_c32_over_in_process_onnx_b32"] = round(on32 / in_process, 3)
        ratios["target_in_process"] = ">= 0.70"
        if off32:
            ratios["batched_over_unbatched_c32"] = round(on32 / off32, 2)
            ratios["target_unbatched"] = ">= 3.0"
    emit("http", {**machine(), "in_process_onnx_b32_images_per_s": round(in_process, 1),
                  "seconds_per_run": args.seconds, "results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
