"""HTTP before/after the fused graph with wrk: ``conceptguard serve`` pinned to CPU 0 (ONNX
Runtime one intra-op thread, one worker) on the demo bank as shipped (``monitor.onnx``) and
on a copy without it (``classifier.onnx`` + numpy ``score()``), wrk pinned to CPU 1, one
Fashion-MNIST test PNG per ``POST /v1/classify`` (multipart). Needs ``wrk`` (Debian:
``apt-get install wrk``) and ``taskset``; the two paths alternate per round.

    .venv/bin/python benchmarks/wrk_fused.py [--seconds 5] [--connections 1 8] [--rounds 2]
        [--env CONCEPTGUARD_ADAPTIVE_BATCHING=false]   # extra server settings
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np
from _common import (
    DEMO_BANK,
    WRK_POST_LUA,
    emit,
    free_port,
    machine,
    serve_pinned,
    stop_server,
    test_images,
)


def png_body(boundary: str) -> bytes:
    from io import BytesIO

    from PIL import Image

    img = (test_images(1)[0, 0] * 255).round().astype(np.uint8)
    buf = BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + \
        buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()


def wrk(url: str, lua: Path, connections: int, seconds: int) -> dict:
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}",
                          f"-d{seconds}s", "--latency", "-s", str(lua), url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests_per_s": rps, "p50": lat.get("50"), "p99": lat.get("99"),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, default=DEMO_BANK)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--env", nargs="*", default=[], help="KEY=VALUE server settings")
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plain = folder / "bank"
        shutil.copytree(args.bank, plain)
        (plain / "monitor.onnx").unlink()
        manifest = json.loads((plain / "manifest.json").read_text())
        del manifest["files"]["monitor.onnx"]
        (plain / "manifest.json").write_text(json.dumps(manifest, indent=2))
        boundary = "conceptguardwrk"
        (folder / "body").write_bytes(png_body(boundary))
        lua = folder / "post.lua"
        lua.write_text(WRK_POST_LUA.format(
            body=folder / "body", ctype=f"multipart/form-data; boundary={boundary}"))
        banks = {"fused": args.bank.resolve(), "numpy": plain}
        runs: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in args.connections}
                                                  for k in banks}
        for _ in range(args.rounds):
            for name, bank in banks.items():
                port = free_port()
                proc = serve_pinned(bank, port, folder / f"{name}.log",
                                    {**extra, "CONCEPTGUARD_GRPC_PORT": str(free_port()),
                                     "CONCEPTGUARD_GRPC_HOST": "127.0.0.1"}, "0")
                try:
                    graph = httpx.get(f"http://127.0.0.1:{port}/v1/bank").json()["runtime"]
                    assert graph["graph"] == ("fused" if name == "fused" else "classifier")
                    url = f"http://127.0.0.1:{port}/v1/classify"
                    wrk(url, lua, 1, 1)  # warm-up
                    for c in args.connections:
                        runs[name][c].append(wrk(url, lua, c, args.seconds))
                finally:
                    stop_server(proc, 15)
    emit("wrk_fused", {**machine(), "seconds": args.seconds, "server_env": extra,
                       "runs": runs})


if __name__ == "__main__":
    main()
