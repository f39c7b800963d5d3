"""List the conceptguard/ and service/ modules whose code runs while the service answers one
``POST /v1/classify`` (after a first request warmed everything), with a profiler hook on
every thread of the process. ``tests/test_request_path.py`` holds the service's count to at
most 6 with :func:`files_run`.

    .venv/bin/python scripts/request_path_files.py [--bank banks/demo] [--body json|multipart|raw]
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
PACKAGES = ("conceptguard", "service")
BODIES = ("json", "multipart", "raw")


def files_run(bank: Path, body: str) -> tuple[int, set[str]]:
    """``(status, files)``: the answer's status and every source file (absolute paths,
    third-party ones included) whose code ran for the second of two ``POST /v1/classify``
    with this kind of body, in a server on ``bank`` (in this process)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    saved = {k: os.environ.get(k) for k in ("CONCEPTGUARD_BANK", "CONCEPTGUARD_GRPC_PORT")}
    os.environ.update(CONCEPTGUARD_BANK=str(bank.resolve()), CONCEPTGUARD_GRPC_PORT="0")
    try:
        settings = load_settings()
    finally:  # the environment as it was (the caller may be a test session)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    pixels = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    png = buf.getvalue()
    recording = False
    seen: set[str] = set()

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if recording and event == "call":
            seen.add(frame.f_code.co_filename)

    sys.setprofile(hook)
    threading.setprofile(hook)  # the server's threads start after this
    try:
        with TestClient(create_app(settings)) as client:
            deadline = time.monotonic() + 120
            while client.get("/v2/health/ready").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the bank did not get ready in 120 s")
                time.sleep(0.1)

            def classify() -> int:
                if body == "json":
                    payload = {"images": [base64.b64encode(png).decode()] * 2}
                    return client.post("/v1/classify", json=payload).status_code
                if body == "raw":
                    return client.post("/v1/classify", content=png,
                                       headers={"Content-Type": "image/png"}).status_code
                files = {"file": ("a.png", png, "image/png")}
                return client.post("/v1/classify", files=files).status_code

            classify()  # warm: first-call imports and caches are not the request path
            recording = True
            status = classify()
            recording = False
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return status, seen


def project_files(files: set[str]) -> list[str]:
    """The conceptguard/ and service/ files among ``files``, relative to the repository."""
    roots = tuple(str(REPO / p) + os.sep for p in PACKAGES)
    return sorted(os.path.relpath(f, REPO) for f in files if f.startswith(roots))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=Path, default=REPO / "banks" / "demo")
    parser.add_argument("--body", choices=BODIES, default="json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    try:
        status, files = files_run(args.bank, args.body)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    if status != 200:
        print(f"POST /v1/classify answered {status}", file=sys.stderr)
        return 1
    ours = project_files(files)
    print(f"{len(ours)} files run by one POST /v1/classify ({args.body} body):")
    for name in ours:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
