"""One serving worker's footprint: start-up time to ready and resident memory (RSS) after a
first request, for a uvicorn worker on the demo bank; median of ``--runs`` starts. Also says
whether libtorch is mapped into the process (it must not be on the ONNX backend).

    .venv/bin/python benchmarks/worker_footprint.py [--backend onnx|torch] [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, machine

from tests.conftest import launch_server, wait_ready  # real servers, no mocks


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="onnx", choices=["onnx", "torch"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            t0 = time.monotonic()
            srv = launch_server(Path(tmp), settings={"backend": args.backend})
            try:
                wait_ready(srv)
                ready_s = time.monotonic() - t0
                httpx.post(f"{srv.url}/v1/classify", files=[("files", ("a.png", png(),
                                                                      "image/png"))])
                status = Path(f"/proc/{srv.process.pid}/status").read_text()
                rss_kib = int(next(line for line in status.splitlines()
                                   if line.startswith("VmRSS")).split()[1])
                maps = Path(f"/proc/{srv.process.pid}/maps").read_text()
                rows.append({"ready_s": round(ready_s, 2), "rss_mib": round(rss_kib / 1024),
                             "libtorch_mapped": "libtorch" in maps})
            finally:
                srv.stop()
    emit("worker_footprint", {**machine(), "backend": args.backend, "runs": rows,
                              "median_ready_s": statistics.median(r["ready_s"] for r in rows),
                              "median_rss_mib": statistics.median(r["rss_mib"] for r in rows)})


if __name__ == "__main__":
    main()
