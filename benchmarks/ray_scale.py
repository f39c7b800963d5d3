"""Ray vs the single-machine product, measured in one run on the same cores.

1. HTTP: ``conceptguard serve`` (uvicorn, 1 worker) vs Ray Serve (1 replica, local Ray on
   ``--cpus``), the same demo bank, the same client (one 28x28 PNG per request,
   ``--concurrency`` in flight): images/s and the ratio.
2. Ray Data: the served-outputs stage (``offline.stages.served_outputs``) over a Parquet file
   of ``--images`` images with 1 and 2 actors: images/s and the ratio; the single process on
   the same stream for reference.
3. Memory: peak RSS of a child process that streams the stage over Parquet files of
   increasing size (``offline.streaming.iter_parquet``) vs one that loads every image first.

    PYTHONPATH=. python benchmarks/ray_scale.py --requests 300 --images 4000

Bounded: every server and the Ray cluster are stopped before the script returns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BANK = REPO / "banks" / "demo"


def _png() -> bytes:
    return (REPO / "examples" / "coat.png").read_bytes()


async def _load(url: str, n: int, concurrency: int) -> float:
    import httpx

    body = _png()
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        async def one() -> None:
            async with sem:
                r = await client.post("/v1/classify",
                                      files={"file": ("x.png", body, "image/png")})
                r.raise_for_status()

        await asyncio.gather(*(one() for _ in range(min(20, n))))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - t0)


def _wait_ready(url: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_http(requests: int, concurrency: int, cpus: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CONCEPTGUARD_BANK": str(BANK),
           "CONCEPTGUARD_GRPC_PORT": "0"}
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "offline.cli", "serve", "--bank", str(BANK),
                             "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url)
        uvicorn_ips = asyncio.run(_load(url, requests, concurrency))
    finally:
        proc.terminate()
        proc.wait(30)

    import ray
    from ray import serve

    from service.ray_serve import build

    os.environ["CONCEPTGUARD_BANK"] = str(BANK)
    port = _free_port()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"num_cpus": 1}), name="conceptguard", route_prefix="/",
                  blocking=False)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url)
        ray_ips = asyncio.run(_load(url, requests, concurrency))
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"requests": requests, "concurrency": concurrency,
            "uvicorn_images_per_s": round(uvicorn_ips, 1),
            "ray_serve_images_per_s": round(ray_ips, 1),
            "ray_over_uvicorn": round(ray_ips / uvicorn_ips, 3)}


def _fixture(folder: Path, n: int) -> Path:
    from offline.streaming import write_parquet

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return write_parquet(folder / f"images-{n}.parquet", images, np.zeros(n, np.int64),
                         rows_per_group=512)


def bench_stage(parquet: Path, n: int, cpus: int) -> dict:
    from functools import partial

    from conceptguard.runtime import OnnxRuntime
    from conceptguard.threads import single_threaded_blas
    from offline.stages import served_outputs
    from offline.streaming import iter_parquet, run_streamed

    single_threaded_blas()
    rt = OnnxRuntime(BANK / "classifier.onnx", device="cpu", threads=1)
    t0 = time.perf_counter()
    run_streamed(partial(served_outputs, rt), iter_parquet(parquet, 1, batch_size=256))
    single = n / (time.perf_counter() - t0)

    import ray

    from offline.ray_data import collect, read_source, run_stage

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = {"images": n, "single_process_images_per_s": round(single, 1)}
    try:
        for workers in (1, 2):
            # the actors and a read task must fit the logical CPUs at once (else it waits)
            ds = run_stage(read_source(parquet, channels=1, override_num_blocks=8), "served",
                           workers=workers, batch_size=256, num_cpus=0.25,
                           bank=str(BANK))
            t0 = time.perf_counter()
            got = collect(ds)
            assert len(got["id"]) == n
            out[f"ray_{workers}_workers_images_per_s"] = round(n / (time.perf_counter() - t0),
                                                               1)
    finally:
        ray.shutdown()
    out["ray_2_over_1_workers"] = round(out["ray_2_workers_images_per_s"]
                                        / out["ray_1_workers_images_per_s"], 3)
    return out


_RSS_CHILD = """
import resource, sys
from functools import partial
import numpy as np
from conceptguard.runtime import OnnxRuntime
from offline.streaming import iter_parquet, run_streamed
from offline.stages import served_outputs, run_batched
path, mode = sys.argv[1], sys.argv[2]
rt = OnnxRuntime("{bank}/classifier.onnx", device="cpu", threads=1)
if mode == "stream":
    out = run_streamed(partial(served_outputs, rt), iter_parquet(path, 1, batch_size=256))
else:
    images = np.concatenate([b["image"] for b in iter_parquet(path, 1, batch_size=4096)])
    out = run_batched(partial(served_outputs, rt), images)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def bench_rss(folder: Path, sizes: list[int]) -> dict:
    code = _RSS_CHILD.format(bank=BANK)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    for n in sizes:
        path = _fixture(folder, n)
        row = {"images": n}
        for mode in ("stream", "in_memory"):
            r = subprocess.run([sys.executable, "-c", code, str(path), mode], env=env,
                               capture_output=True, text=True, check=True, timeout=600)
            row[f"{mode}_peak_rss_mib"] = int(r.stdout.strip().splitlines()[-1])
        rows.append(row)
    return {"rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--rss-sizes", default="5000,20000,60000")
    p.add_argument("--skip", default="", help="comma-separated: http,stage,rss")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"cpus": args.cpus, "cores_on_host": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="cg-ray-bench-") as tmp:
        if "http" not in skip:
            result["http"] = bench_http(args.requests, args.concurrency, args.cpus)
            print(json.dumps(result["http"]), file=sys.stderr)
        if "stage" not in skip:
            result["stage"] = bench_stage(_fixture(Path(tmp), args.images), args.images,
                                          args.cpus)
            print(json.dumps(result["stage"]), file=sys.stderr)
        if "rss" not in skip:
            result["rss"] = bench_rss(Path(tmp), [int(x) for x in args.rss_sizes.split(",")])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
