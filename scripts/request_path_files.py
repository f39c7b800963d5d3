"""List the conceptguard/ and service/ modules whose code runs while the service answers one
``POST /v1/classify`` (after a first request warmed everything), with a profiler hook on
every thread of the process.

    .venv/bin/python scripts/request_path_files.py [--bank banks/demo] [--body json|multipart]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PACKAGES = ("conceptguard", "service")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=Path, default=REPO / "banks" / "demo")
    parser.add_argument("--body", choices=("json", "multipart"), default="json")
    args = parser.parse_args()
    os.environ["CONCEPTGUARD_BANK"] = str(args.bank.resolve())
    os.environ["CONCEPTGUARD_GRPC_PORT"] = "0"
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    pixels = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    png = buf.getvalue()
    roots = tuple(str(REPO / p) + os.sep for p in PACKAGES)
    recording = False
    seen: set[str] = set()

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if recording and event == "call" and frame.f_code.co_filename.startswith(roots):
            seen.add(os.path.relpath(frame.f_code.co_filename, REPO))

    sys.setprofile(hook)
    threading.setprofile(hook)  # the server's threads start after this
    with TestClient(create_app(load_settings())) as client:
        deadline = time.monotonic() + 120
        while client.get("/v2/health/ready").status_code != 200:
            if time.monotonic() > deadline:
                print("the bank did not get ready in 120 s", file=sys.stderr)
                return 1
            time.sleep(0.1)

        def classify() -> int:
            if args.body == "json":
                body = {"images": [base64.b64encode(png).decode()] * 2}
                return client.post("/v1/classify", json=body).status_code
            files = {"file": ("a.png", png, "image/png")}
            return client.post("/v1/classify", files=files).status_code

        classify()  # warm: first-call imports and caches are not the request path
        recording = True
        status = classify()
        recording = False
    sys.setprofile(None)
    threading.setprofile(None)  # type: ignore[arg-type]
    if status != 200:
        print(f"POST /v1/classify answered {status}", file=sys.stderr)
        return 1
    print(f"{len(seen)} files run by one POST /v1/classify ({args.body} body):")
    for name in sorted(seen):
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
