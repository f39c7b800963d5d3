"""conceptguard against its peers on the same model, one PNG per request, with wrk.

Servers (each in its own environment, pinned to CPU 0 with ``taskset -c 0``, ONNX Runtime at
one intra-op thread, one process):

* ``conceptguard serve`` on the demo bank as shipped (``monitor.onnx``: classifier + monitor
  in one graph), three ways in: raw body (``POST /v1/classify``, ``Content-Type:
  image/png``), multipart (same route, field ``file``), v2 JSON (``POST
  /v2/models/<bank>/infer``, one base64 BYTES element);
* a hand-written FastAPI + ONNX Runtime server without a monitor
  (``benchmarks/peers/fastapi_ort.py``: decode, 28x28 grey, ``classifier.onnx``, softmax,
  JSON), raw body and multipart; its venv holds ``fastapi uvicorn[standard] onnxruntime
  pillow numpy python-multipart`` (uvloop + httptools); the same server once more with
  ``uvicorn --http h11`` (uvicorn's pure-Python parser; conceptguard
  serves with httptools) to tell the parser's share of a gap from the rest;
* MLServer 1.7.1 with a small custom ONNX Runtime runtime (``benchmarks/peers/mlserver_ort``)
  on v2 JSON with the PNG as a base64 BYTES element, ``parallel_workers: 0`` (inference in
  the server process), no monitor.

The load generator is wrk (C; ``apt-get install wrk``), one thread, pinned to CPU 1, with a
Lua script that POSTs the same PNG every time. The runs are paired: every server is started
once and stays up (an idle one takes no measurable CPU), and in each round, for each
connection count, every row runs one after the other within seconds (the order reversed
every other round). The server's CPU time (utime + stime, plus reaped children, of its whole
process tree, from ``/proc``) is read before and after each run: CPU ms per request = CPU
time / requests answered. A ratio to a peer is the median over the rounds of that round's
own ratio (and the p50 difference the median of the rounds' differences), so a drift of
the machine's speed over minutes cancels instead of landing on one server.

The peer venvs are created under ``.cache/peers/`` on first use (a few minutes, once; later
runs reuse them). One command, ~5-6 minutes with the defaults:

    PYTHONPATH=. .venv/bin/python benchmarks/peers.py [--seconds 3] [--rounds 4]
        [--connections 1 8 64] [--skip mlserver] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from _common import DEMO_BANK, REPO, WRK_POST_LUA, machine, provenance, test_images

PEERS = REPO / "benchmarks" / "peers"
CACHE = REPO / ".cache" / "peers"
VENVS = {  # name -> pip requirements of its own environment
    "fastapi": ["fastapi", "uvicorn[standard]", "onnxruntime", "pillow", "numpy",
                "python-multipart"],
    "mlserver": ["mlserver==1.7.1", "onnxruntime", "pillow"],
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "ORT_THREADS": "1"}



# ---------------------------------------------------------------- environments


def venv(name: str) -> tuple[Path | None, str]:
    """The peer's venv (created once, with a message); ``(None, why)`` if it cannot be."""
    folder = CACHE / f"{name}-venv"
    marker = folder / ".conceptguard-peer"
    want = " ".join(VENVS[name])
    if marker.exists() and marker.read_text() == want:
        return folder, ""
    print(f"[peers] setting up {folder.relative_to(REPO)} ({want}); once, reused later",
          file=sys.stderr, flush=True)
    try:
        if not (folder / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q",
                        *VENVS[name]], check=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        return None, f"could not install {want}: {exc}"
    marker.write_text(want)
    return folder, ""


def versions(py: Path, modules: list[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    try:
        out = subprocess.run([str(py), "-c", code, *modules], capture_output=True, text=True,
                             check=True).stdout
        return json.loads(out)
    except (subprocess.CalledProcessError, ValueError):
        return {}


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str]
    ready: str  # path answering 200 once it serves
    port: int
    proc: subprocess.Popen | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self, log: Path) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CONCEPTGUARD_", "MLSERVER_", "PYTHONPATH"))}
        env.update(ONE_THREAD)
        env.update(self.env)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(["taskset", "-c", "0", *self.cmd], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url(self.ready), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} not ready in 180 s:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def tree_cpu_ticks(root: int) -> int:
    """utime + stime + cutime + cstime over ``root`` and its live descendants."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        ppid = int(fields[1])
        stats[int(entry)] = (ppid, sum(int(x) for x in fields[11:15]))
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(stats[p][1] for p in tree if p in stats)


# ---------------------------------------------------------------- load


def to_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url: str, lua: Path, connections: int, seconds: int) -> dict:
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}",
                          f"-d{seconds}s", "--timeout", "10s", "--latency", "-s", str(lua),
                          url], capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    return {"requests": requests,
            "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": to_ms(lat["50"]), "p99_ms": to_ms(lat["99"]),
            "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0}


def measure(server: Server, url: str, lua: Path, connections: int, seconds: int) -> dict:
    before = tree_cpu_ticks(server.proc.pid)
    run = wrk(url, lua, connections, seconds)
    after = tree_cpu_ticks(server.proc.pid)
    run["cpu_ms_per_request"] = ((after - before) * 1000.0 / CLK_TCK
                                 / max(run["requests"], 1))
    return run


def png_bytes() -> bytes:
    from PIL import Image

    img = (test_images(1)[0, 0] * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def bodies(folder: Path, png: bytes) -> dict[str, Path]:
    """Lua scripts: ``raw``, ``multipart``, ``v2`` (JSON, one base64 BYTES element)."""
    boundary = "conceptguardpeers"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                 f"filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + png + \
        f"\r\n--{boundary}--\r\n".encode()
    v2 = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                 "data": [base64.b64encode(png).decode()]}]}).encode()
    kinds = {"raw": (png, "image/png"),
             "multipart": (multipart, f"multipart/form-data; boundary={boundary}"),
             "v2": (v2, "application/json")}
    out = {}
    for kind, (body, ctype) in kinds.items():
        (folder / f"{kind}.body").write_bytes(body)
        lua = folder / f"{kind}.lua"
        lua.write_text(WRK_POST_LUA.format(body=folder / f"{kind}.body", ctype=ctype))
        out[kind] = lua
    return out


# ---------------------------------------------------------------- report


ROWS = [  # (row label, server, path, body)
    ("conceptguard, raw body (with monitor)", "conceptguard", "/v1/classify", "raw"),
    ("conceptguard, multipart (with monitor)", "conceptguard", "/v1/classify", "multipart"),
    ("conceptguard, v2 JSON base64 (with monitor)", "conceptguard", "/v2/models/{model}/infer",
     "v2"),
    ("hand-written FastAPI + ORT, raw body (no monitor)", "fastapi", "/classify", "raw"),
    ("hand-written FastAPI + ORT, multipart (no monitor)", "fastapi", "/classify/file",
     "multipart"),
    ("hand-written FastAPI + ORT on h11 (uvicorn's pure-Python parser), raw body "
     "(no monitor)", "fastapi-h11", "/classify", "raw"),
    ("MLServer 1.7.1 + custom ORT runtime, v2 JSON base64 (no monitor)", "mlserver",
     "/v2/models/classifier/infer", "v2"),
]
P50_GOAL_MS = 0.5  # p50 at the first connection count at most this much above the peer's
GOALS = [  # (conceptguard row, peer row)
    (0, 3), (1, 4), (2, 6), (0, 5),
]


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(results: dict[str, dict[int, list[dict]]], connections: list[int],
          failed: dict[str, str]) -> str:
    head = ("| server, request | " + " | ".join(f"CPU ms / req, c={c}" for c in connections)
            + f" | req/s at c={connections[0]} (p50 ms) |")
    lines = [head, "|" + " --- |" * (len(connections) + 2)]
    for label, server, _, _ in ROWS:
        runs = results.get(label)
        if not runs:
            why = failed.get(server, "not run")
            lines.append(f"| {label} | " + " | ".join("-" for _ in connections)
                         + f" | not measured: {why} |")
            continue
        cells = []
        for c in connections:
            rounds = ", ".join(f"{r['cpu_ms_per_request']:.2f}" for r in runs[c])
            cells.append(f"**{median(runs[c], 'cpu_ms_per_request'):.2f}** ({rounds})")
        c0 = runs[connections[0]]
        cells.append(f"{median(c0, 'requests_per_s'):.0f} "
                     f"(p50 {median(c0, 'p50_ms'):.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: dict[str, dict[int, list[dict]]], connections: list[int]) -> tuple[str, dict]:
    lines = ["| conceptguard (with monitor) vs. peer (without) | "
             + " | ".join(f"CPU ratio c={c}" for c in connections)
             + f" | p50 difference c={connections[0]} |",
             "|" + " --- |" * (len(connections) + 2)]
    summary = {}
    for ours, theirs in GOALS:
        a, b = results.get(ROWS[ours][0]), results.get(ROWS[theirs][0])
        if not a or not b:
            continue
        # paired: each round's own ratio (its runs seconds apart), then the median
        ratios = {c: statistics.median(x["cpu_ms_per_request"] / y["cpu_ms_per_request"]
                                       for x, y in zip(a[c], b[c], strict=False))
                  for c in connections}
        dp50 = statistics.median(x["p50_ms"] - y["p50_ms"] for x, y in
                                 zip(a[connections[0]], b[connections[0]], strict=False))
        name = f"{ROWS[ours][0]} / {ROWS[theirs][0]}"
        summary[name] = {"cpu_ratio": ratios, "p50_difference_ms": dp50,
                         "cpu_goal_met": all(r <= 1.0 for r in ratios.values()),
                         "p50_goal_met": dp50 <= P50_GOAL_MS}
        cells = [f"{r:.2f} ({'met' if r <= 1.0 else 'not met'})" for r in ratios.values()]
        cells.append(f"{dp50:+.2f} ms ({'met' if dp50 <= P50_GOAL_MS else 'not met'})")
        lines.append(f"| {ROWS[ours][3]}: {ROWS[ours][0].split(',')[0]} / "
                     f"{ROWS[theirs][0].split(',')[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


# ---------------------------------------------------------------- main


def servers(bank: Path, skip: set[str], failed: dict[str, str]) -> dict[str, Server]:
    out: dict[str, Server] = {}
    if "conceptguard" not in skip:
        port = free_port()
        out["conceptguard"] = Server(
            "conceptguard",
            [sys.executable, "-m", "offline.cli", "serve", "--bank", str(bank), "--port",
             str(port), "--log-level", "warning"],
            {"CONCEPTGUARD_THREADS": "1", "CONCEPTGUARD_DEVICE": "cpu",
             "CONCEPTGUARD_GRPC_PORT": "0", "PYTHONPATH": str(REPO)},
            "/v2/health/ready", port)
    for name in ("fastapi", "fastapi-h11", "mlserver"):
        if name in skip:
            failed[name] = "skipped (--skip)"
            continue
        folder, why = venv(name.removesuffix("-h11"))
        if folder is None:
            failed[name] = why
            continue
        port = free_port()
        model = {"CLASSIFIER_ONNX": str(bank / "classifier.onnx")}
        if name.startswith("fastapi"):
            h11 = ["--http", "h11"] if name.endswith("-h11") else []
            out[name] = Server(name, [str(folder / "bin" / "uvicorn"), "fastapi_ort:app",
                                      "--app-dir", str(PEERS), "--port", str(port),
                                      "--log-level", "warning", "--no-access-log", *h11],
                               model, "/health", port)
        else:
            out[name] = Server(name, [str(folder / "bin" / "mlserver"), "start",
                                      str(PEERS / "mlserver_ort")],
                               {**model, "MLSERVER_HTTP_PORT": str(port),
                                "MLSERVER_GRPC_PORT": str(free_port()),
                                "MLSERVER_METRICS_PORT": str(free_port())},
                               "/v2/models/classifier/ready", port)
    return out


def start_all(srv: dict[str, Server], live: list[Server], folder: Path, model: str,
              luas: dict[str, Path], failed: dict[str, str]
              ) -> list[tuple[str, Server, str, Path]]:
    """Start every server (appended to ``live`` as it comes up), check that conceptguard
    serves the fused graph, warm each row with a one-second run that must answer 2xx; the
    rows to measure, in ROWS order."""
    for name, server in srv.items():
        try:
            server.start(folder / f"{name}.log")
        except RuntimeError as exc:
            failed[name] = str(exc).splitlines()[0]
            print(f"[peers] {exc}", file=sys.stderr)
            continue
        live.append(server)
        if name == "conceptguard":
            runtime = httpx.get(server.url("/v1/bank")).json()["runtime"]
            if runtime.get("graph") != "fused":
                sys.exit(f"conceptguard is not serving the fused graph: {runtime}")
    rows = []
    for label, owner, path, kind in ROWS:
        server = srv.get(owner)
        if server is None or owner in failed:
            continue
        url = server.url(path.format(model=model))
        check = wrk(url, luas[kind], 1, 1)  # warm-up, and a sanity check
        if check["non_2xx"] or not check["requests"]:
            raise RuntimeError(f"{label}: {check}")
        rows.append((label, server, url, luas[kind]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank", type=Path, default=DEMO_BANK)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--skip", nargs="*", default=[], choices=["conceptguard", "fastapi",
                                                               "fastapi-h11", "mlserver"])
    ap.add_argument("--json", type=Path, help="also write the raw runs here")
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("peers.py pins the server to CPU 0 and wrk to CPU 1: needs 2 CPUs")
    bank = args.bank.resolve()
    started = dt.datetime.now(dt.UTC)
    failed: dict[str, str] = {}
    srv = servers(bank, set(args.skip), failed)
    model = json.loads((bank / "manifest.json").read_text())["name"]
    results: dict[str, dict[int, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        luas = bodies(folder, png_bytes())
        live: list[Server] = []
        try:
            rows = start_all(srv, live, folder, model, luas, failed)
            for rnd in range(args.rounds):
                for c in args.connections:
                    for label, server, url, lua in (rows if rnd % 2 == 0 else rows[::-1]):
                        run = measure(server, url, lua, c, args.seconds)
                        results.setdefault(label, {k: [] for k in args.connections})[c] \
                            .append(run)
                        print(f"[peers] round {rnd + 1} {label} c={c}: "
                              f"{run['requests_per_s']:.0f} req/s, p50 "
                              f"{run['p50_ms']:.2f} ms, "
                              f"{run['cpu_ms_per_request']:.2f} CPU ms/req, "
                              f"non-2xx {run['non_2xx']}", file=sys.stderr, flush=True)
        finally:
            for server in live:
                server.stop()
    peer_versions = {}
    for name, mods in (("fastapi", ["fastapi", "uvicorn", "uvloop", "httptools",
                                    "onnxruntime"]),
                       ("mlserver", ["mlserver", "fastapi", "uvicorn", "onnxruntime"])):
        py = CACHE / f"{name}-venv" / "bin" / "python"
        if py.exists():
            peer_versions[name] = versions(py, mods)
    peer_versions["conceptguard"] = versions(Path(sys.executable),
                                             ["fastapi", "uvicorn", "onnxruntime"])
    text, summary = goals(results, args.connections)
    print(f"\nDate: {started:%Y-%m-%d %H:%M} UTC; {args.seconds} s per point, "
          f"{args.rounds} paired rounds; median of the rounds in bold, each round in "
          "brackets; ratios: median of the rounds' own ratios\n")
    print(table(results, args.connections, failed))
    print()
    print(text)
    print("\nVersions:", json.dumps(peer_versions))
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "peers", **provenance(), **machine(), "date": started.isoformat(),
            "seconds": args.seconds, "rounds": args.rounds, "pairing": "paired rounds",
            "versions": peer_versions,
            "failed": failed, "runs": results, "goals": summary}, indent=2, default=float))


if __name__ == "__main__":
    main()
