"""From a fresh clone to the first answer: clone the repository, run ``scripts/demo.sh``
(a new .venv with the serving set, then the server) and time until ``POST /v1/classify``
answers 200. By default with cold package caches (``UV_NO_CACHE=1``, ``PIP_NO_CACHE_DIR=1``),
as on a fresh machine. The load average is recorded: on a shared machine the time grows.

    .venv/bin/python benchmarks/first_answer.py [--warm-cache] [--rounds 1]
    BENCH_RESULT=benchmarks/results/first-answer.json .venv/bin/python benchmarks/first_answer.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _classify(port: int, png: bytes) -> bool:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"coat.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + png + \
        f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/classify", data=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200 and b'"trust"' in r.read()
    except OSError:
        return False


def one_round(warm_cache: bool, timeout_s: float) -> dict:
    png = (REPO / "examples" / "coat.png").read_bytes()
    with tempfile.TemporaryDirectory(prefix="cg-first-answer-") as tmp:
        clone = Path(tmp) / "conceptguard"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CONCEPTGUARD_") and k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
        if not warm_cache:
            env.update(UV_NO_CACHE="1", PIP_NO_CACHE_DIR="1")
        port = _free_port()
        load_before = os.getloadavg()[0]
        start = time.monotonic()
        log = open(Path(tmp) / "demo.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(["scripts/demo.sh", "--port", str(port)], cwd=clone, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        answered = None
        try:
            while time.monotonic() - start < timeout_s and proc.poll() is None:
                if _classify(port, png):
                    answered = time.monotonic() - start
                    break
                time.sleep(0.2)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
            log.close()
        venv_mb = int(subprocess.run(["du", "-sm", str(clone / ".venv")], capture_output=True,
                                     text=True).stdout.split()[0])
        if answered is None:
            raise SystemExit("no answer: " + (Path(tmp) / "demo.log").read_text()[-2000:])
        return {"seconds": round(answered, 1), "venv_mb": venv_mb,
                "load_average_before": round(load_before, 2),
                "load_average_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warm-cache", action="store_true",
                    help="let uv/pip use their download caches (a second install)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()
    from _common import emit, machine

    rounds = [one_round(args.warm_cache, args.timeout) for _ in range(args.rounds)]
    emit("first_answer", {**machine(), "cold_cache": not args.warm_cache, "rounds": rounds,
                          "seconds": max(r["seconds"] for r in rounds),
                          "goal_seconds": 60})


if __name__ == "__main__":
    main()
