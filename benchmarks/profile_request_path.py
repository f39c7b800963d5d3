"""Profile the request path of the service with pyinstrument: a uvicorn server runs under
the profiler (batching on, one worker), a bounded client sends single-image requests, the
server stops and the profile is written to runs/profile_request_path.{txt,html}.

    .venv/bin/python benchmarks/profile_request_path.py [--requests 2000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

from _common import REPO
from http_load import free_port


async def _send(url: str, png: bytes, n: int, concurrency: int) -> int:
    import httpx

    done = 0
    async with httpx.AsyncClient(timeout=60) as client:
        async def worker() -> None:
            nonlocal done
            while done < n:
                done += 1
                await client.post(url, files={"file": ("x.png", png, "image/png")})

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    out = REPO / "runs"
    out.mkdir(exist_ok=True)
    port = free_port()
    env = {**os.environ, "CONCEPTGUARD_BANK": str(REPO / "banks" / "demo"),
           "HF_HUB_OFFLINE": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o",
           str(out / "profile_request_path.txt"), "-m", "uvicorn", "service.app:app",
           "--port", str(port), "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        png = (REPO / "examples" / "coat.png").read_bytes()
        t0 = time.perf_counter()
        n = asyncio.run(_send(f"http://127.0.0.1:{port}/v1/classify", png, args.requests,
                              args.concurrency))
        print(f"{n} requests in {time.perf_counter() - t0:.1f} s")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    print(f"profile: {out / 'profile_request_path.txt'}")


if __name__ == "__main__":
    main()
