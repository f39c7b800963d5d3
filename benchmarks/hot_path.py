"""The hot endpoints in process: CPU ms per request through the app's own ASGI callable (the
middleware, the route, the data plane with its batcher and inference thread; no HTTP
server, no client), one request at a time, for a raw PNG body and a multipart body on
``POST /v1/classify`` and a v2 JSON body (one base64 BYTES element). CPU = the process's
CPU time (every thread) / requests, after a warm-up.

``--repo`` adds other checkouts of this repository (e.g. ``main``, from ``git worktree
add``), each served from its own code by the same driver in a subprocess; rounds alternate
the checkouts, and the median round is reported, so a before/after on a shared machine
reads the ratio of two medians taken side by side. The server process is pinned to CPU 0
when ``taskset`` is there, ONNX Runtime at one intra-op thread. Also timed, for the raw PNG
without HTTP: the batch function alone (``run_batch``: decode, runtime, scores)
and the data plane's whole round (``classify_images``: queue, batcher, the inference
thread and back); their difference is what the thread hop costs a lone request.

    .venv/bin/python benchmarks/hot_path.py [--requests 500] [--rounds 5] [--repo ../main]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from _common import REPO, emit, machine

KINDS = ("raw", "multipart", "v2", "run_batch", "classify_images")

_DRIVER = r"""
import asyncio, base64, io, json, os, sys, time
import numpy as np
from PIL import Image
repo, n = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, repo)
os.environ["CONCEPTGUARD_GRPC_PORT"] = "0"
from service.app import create_app
from service.settings import load_settings
app = create_app(load_settings(bank=f"{repo}/banks/demo", threads=1, device="cpu"))
buf = io.BytesIO()
Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(
    buf, format="PNG")
png = buf.getvalue()
b = "hotpathboundary"
multipart = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
             "Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{b}--\r\n".encode()
model = json.loads(open(f"{repo}/banks/demo/manifest.json").read())["name"]
v2 = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                             "data": [base64.b64encode(png).decode()]}]}).encode()
kinds = {"raw": ("/v1/classify", png, b"image/png"),
         "multipart": ("/v1/classify", multipart,
                       f"multipart/form-data; boundary={b}".encode()),
         "v2": (f"/v2/models/{model}/infer", v2, b"application/json")}


async def one(path, body, ctype):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 2),
             "headers": [(b"host", b"x"), (b"content-type", ctype),
                         (b"content-length", str(len(body)).encode())]}
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    status = []

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise SystemExit(f"{path} answered {status}")


def flush():
    try:
        from service.batch_metrics import flush_all
    except ImportError:  # a checkout from before the metrics were flushed
        return
    flush_all()


async def main():
    async with app.router.lifespan_context(app):
        while not app.state.runtime_state.ready:
            await asyncio.sleep(0.05)
        out = {}
        for kind, args in kinds.items():
            for _ in range(50):
                await one(*args)
            flush()
            c0 = time.process_time()
            for _ in range(n):
                await one(*args)
            flush()  # metrics written off the request path are still this kind's CPU
            out[kind] = (time.process_time() - c0) / n * 1e3
        # the raw PNG without HTTP: the batch function alone (decode, runtime, scores)
        # and through the data plane (queue, batcher, inference thread and back)
        from service.dataplane import Job
        dp = app.state.dataplane
        loaded = dp.state.require()
        flush()
        c0 = time.process_time()
        for _ in range(n):
            dp.run_batch([Job(loaded, png)])
        flush()
        out["run_batch"] = (time.process_time() - c0) / n * 1e3
        c0 = time.process_time()
        for _ in range(n):
            await dp.classify_images(loaded, [png])
        flush()
        out["classify_images"] = (time.process_time() - c0) / n * 1e3
        print(json.dumps(out))

asyncio.run(main())
"""


def run_once(repo: Path, requests: int) -> dict[str, float]:
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCEPTGUARD_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    out = subprocess.run([*pin, sys.executable, "-c", _DRIVER, str(repo), str(requests)],
                         capture_output=True, text=True, env=env, cwd=repo, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"hot_path: {repo}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repo", type=Path, action="append", default=[],
                    help="another checkout to measure side by side (repeatable)")
    args = ap.parse_args()
    repos = [REPO, *(r.resolve() for r in args.repo)]
    runs: dict[str, list[dict[str, float]]] = {str(r): [] for r in repos}
    for rnd in range(args.rounds):
        for repo in repos:
            got = run_once(repo, args.requests)
            runs[str(repo)].append(got)
            print(f"[hot_path] round {rnd + 1} {repo}: "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in got.items()), file=sys.stderr,
                  flush=True)
    medians = {repo: {k: statistics.median(r[k] for r in rs) for k in KINDS}
               for repo, rs in runs.items()}
    emit("hot-path", {**machine(), "load_average": os.getloadavg(), "requests": args.requests,
                      "rounds": args.rounds, "cpu_ms_per_request_median": medians,
                      "runs": runs})


if __name__ == "__main__":
    main()
