"""GPU vs CPU in one go: the serving graph (classifier + concept projection) on ONNX Runtime
and torch, CUDA and CPU, batch 1 / 64 / 256; the classifier and the monitor as one torch
module (``+ monitor``: the service's torch backend on a bank with a fused graph, with its
overhead over the serving graph on the same device), compiled with CUDA graphs on CUDA;
plus the monitor's numpy scoring step; images/s. Then the HTTP path: ``conceptguard serve``
on the torch backend (CUDA when present) under closed-loop clients (``--no-http`` skips it;
without the service's dependencies it is skipped with a note).

    python benchmarks/gpu.py [--bank banks/demo] [--seconds 1.0] [--out benchmarks/results]

On a machine whose Python lacks the bank loader's dependencies (pydantic, safetensors),
write the monitor's state here first and pass it there:

    python benchmarks/gpu.py --write-monitor-state runs/gpu/monitor-graph.safetensors
    python benchmarks/gpu.py --monitor-state runs/gpu/monitor-graph.safetensors  # GPU machine

Needs only torch (torchvision for the demo classifier), numpy and this repository;
onnxruntime / onnxruntime-gpu when present (without a CUDA session it reports "ORT CUDA
unavailable" and goes on with torch). It reads the bank with a stdlib safetensors reader, so
pydantic and safetensors are optional (without them the scoring step is skipped). Bounded:
about 25 measurements of ``--seconds`` each plus warm-up, ``torch.compile`` of two modules
(a minute or two on CUDA; ``--no-compile`` skips it) and the HTTP path (the server's start
and twice ``max(3 * --seconds, 2)`` s): well inside 10 minutes. Writes
``<out>/gpu.json`` and, when a CUDA device is there, the table into docs/benchmarks.md between
the ``gpu-benchmark`` markers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DOCS = REPO / "docs" / "benchmarks.md"
START, END = "<!-- gpu-benchmark:start -->", "<!-- gpu-benchmark:end -->"
NP_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64,
             "I32": np.int32, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A safetensors file as numpy arrays + metadata (stdlib + numpy only)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None) or {}
    data = raw[8 + n:]
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        out[name] = np.frombuffer(data[b:end], dtype=NP_DTYPES[e["dtype"]]).reshape(e["shape"])
    return out, meta


def timed(fn, items: int, seconds: float) -> dict:
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    arr = np.array(times)
    return {"images_per_s": round(items * len(arr) / arr.sum(), 1),
            "p50_ms": round(float(np.median(arr)) * 1e3, 3), "calls": len(arr)}


ROUNDS = 3  # interleaved rounds per batch size


def median_round(rounds: list[dict]) -> dict:
    """The round with the median images/s, with every round's images/s beside it."""
    ordered = sorted(rounds, key=lambda r: r["images_per_s"])
    return {**ordered[len(ordered) // 2],
            "rounds_images_per_s": [r["images_per_s"] for r in rounds]}


def torch_module(bank: Path):
    """The bank's MonitoredClassifier (classifier + concept projection) built with torch."""
    from conceptguard.classifier.demo_resnet import small_resnet
    from conceptguard.classifier.split import split_torchvision_resnet
    from conceptguard.export import MonitoredClassifier
    from conceptguard.projection import PROJECTION_KEYS

    weights, meta = read_safetensors(bank / "classifier.safetensors")
    spec = json.loads(meta["spec"])
    if spec["arch"] != "small_resnet":
        raise RuntimeError(f"this script builds the demo arch only, not {spec['arch']}")
    model = small_resnet(spec["num_classes"], spec["in_channels"],
                         spec.get("widths") or (16, 32, 64, 128))
    split = split_torchvision_resnet(model, spec["mean"], spec["std"],
                                     (spec["in_channels"], spec["input_size"],
                                      spec["input_size"]))
    import torch

    split.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    tensors, _ = read_safetensors(bank / "tensors.safetensors")
    return MonitoredClassifier(split.eval(), {k: tensors[k].copy() for k in PROJECTION_KEYS}), spec


def http_path(bank: Path, device: str, seconds: float, clients: tuple[int, ...] = (1, 16)
              ) -> dict:
    """``conceptguard serve --backend torch`` on ``device`` (the fused module when the bank
    has a fused graph), loaded by ``clients`` closed-loop client threads posting one PNG
    each (``POST /v1/classify``, raw body) for ``seconds``: requests/s and latency
    percentiles. The clients are Python threads on the same machine: at high rates they,
    not the server, can be the limit. Raises ``ImportError`` without the service's
    dependencies."""
    import http.client
    import io
    import socket
    import subprocess
    import tempfile

    import fastapi  # noqa: F401  (the service's dependencies, or ImportError)
    import uvicorn  # noqa: F401
    from PIL import Image

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCEPTGUARD_")}
    env.update(CONCEPTGUARD_BACKEND="torch", CONCEPTGUARD_DEVICE=device,
               CONCEPTGUARD_GRPC_PORT="0", CONCEPTGUARD_THREADS="0")
    with tempfile.TemporaryFile() as log:  # the server's output (a pipe could fill)
        proc = subprocess.Popen([sys.executable, "-m", "offline.cli", "serve", "--bank", str(bank),
                                 "--host", "127.0.0.1", "--port", str(port), "--log-level",
                                 "warning"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

        def request(method: str, path: str) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                conn.request(method, path)
                r = conn.getresponse()
                return r.status, r.read()
            finally:
                conn.close()

        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the server exited: {log.read()[-1500:]!r}")
                try:
                    if request("GET", "/v2/health/ready")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server was not ready in 300 s")
                time.sleep(0.5)
            runtime = json.loads(request("GET", "/v1/bank")[1])["runtime"]
            buf = io.BytesIO()
            pixels = (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(buf, format="PNG")
            png = buf.getvalue()
            out: dict = {"runtime": runtime}
            for n in clients:
                out[f"clients_{n}"] = _closed_loop(port, png, n, seconds)
            return out
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _closed_loop(port: int, png: bytes, clients: int, seconds: float) -> dict:
    """``clients`` threads, each on its own connection, posting ``png`` back to back for
    ``seconds``: requests/s, latency percentiles, answers other than 200."""
    import http.client
    import threading

    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, bad = [], 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            conn.request("POST", "/v1/classify", body=png,
                         headers={"Content-Type": "image/png"})
            r = conn.getresponse()
            r.read()
            mine.append(time.perf_counter() - t0)
            bad += r.status != 200
        with lock:
            latencies.extend(mine)
            failures.append(bad)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    arr = np.array(latencies) * 1e3
    return {"requests_per_s": round(len(arr) / (time.monotonic() - start), 1),
            "p50_ms": round(float(np.percentile(arr, 50)), 3),
            "p99_ms": round(float(np.percentile(arr, 99)), 3),
            "requests": len(arr), "non_200": sum(failures)}


def write_monitor_state(bank: Path, path: Path) -> int:
    """The bank's :class:`~conceptguard.monitor_graph.MonitorGraph` constants and shape as a
    safetensors file (here, where the bank loads), for ``--monitor-state`` there."""
    from safetensors.numpy import save_file

    from conceptguard.bank import load_bank
    from conceptguard.monitor_graph import MonitorGraph

    tensors, meta = MonitorGraph(load_bank(bank).monitor).state()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank", type=Path, default=REPO / "banks" / "demo")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--no-docs", action="store_true", help="do not edit docs/benchmarks.md")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time torch.compile (mode reduce-overhead: CUDA graphs) on CUDA")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch's CPU threads (0: torch's default, one per core)")
    ap.add_argument("--http", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the HTTP path: conceptguard serve on the torch backend, "
                         "on CUDA when present (needs the service's dependencies)")
    ap.add_argument("--monitor-state", type=Path, default=None,
                    help="the monitor graph's state (see --write-monitor-state), for a "
                         "machine where the bank loader's dependencies are missing")
    ap.add_argument("--write-monitor-state", type=Path, default=None, metavar="PATH",
                    help="write the bank's monitor graph state to PATH and exit")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.write_monitor_state is not None:
        return write_monitor_state(args.bank, args.write_monitor_state)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    info = {"python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None}
    module, spec = torch_module(args.bank)
    c, s = spec["in_channels"], spec["input_size"]
    rng = np.random.default_rng(0)
    runtimes: dict[str, object] = {}
    notes: list[str] = []

    # torch, CPU and CUDA
    def torch_runner(device: str, net=module, compiled: bool = False):
        """The service's own torch runtime on ``net`` (its copies back to the host
        included)."""
        from conceptguard.runtime import TorchRuntime

        rt = TorchRuntime(copy.deepcopy(net), device=device, compile=compiled,
                          graph="fused" if net is not module else "classifier",
                          compile_mode="reduce-overhead" if compiled else None)
        if compiled:  # compile now, with every batch size, outside the timings
            for b in batches:
                rt.run(rng.random((b, c, s, s), dtype=np.float32))
        return rt.run

    runtimes["torch cpu"] = torch_runner("cpu")
    if cuda:
        runtimes["torch cuda"] = torch_runner("cuda")
    else:
        notes.append("torch sees no CUDA device")

    # ONNX Runtime, CPU and CUDA (the session's providers decide, not the installed list)
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_available_providers"] = ort.get_available_providers()
        onnx = str(args.bank / "classifier.onnx")
        cpu_sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        runtimes["onnx cpu"] = lambda x, s_=cpu_sess: s_.run(None, {"images": x})
        if "CUDAExecutionProvider" in ort.get_available_providers():
            gpu_sess = ort.InferenceSession(onnx, providers=["CUDAExecutionProvider",
                                                             "CPUExecutionProvider"])
            info["ort_session_providers"] = gpu_sess.get_providers()
            if gpu_sess.get_providers()[0] == "CUDAExecutionProvider":
                runtimes["onnx cuda"] = lambda x, s_=gpu_sess: s_.run(None, {"images": x})
            else:
                notes.append("ORT CUDA unavailable: the CUDA provider did not load "
                             f"(session: {gpu_sess.get_providers()})")
        else:
            notes.append("ORT CUDA unavailable: onnxruntime has no CUDA provider "
                         "(install onnxruntime-gpu)")
    except ImportError:
        notes.append("onnxruntime not installed: ONNX rows skipped")

    # the monitor's scoring step (numpy, CPU) when the core's bank loader imports
    monitor = None
    try:
        from conceptguard.bank import load_bank
        from conceptguard.scoring import score

        monitor = load_bank(args.bank).monitor
    except Exception as exc:  # pydantic/safetensors missing: graph only
        notes.append(f"scoring skipped ({type(exc).__name__}: {exc})"[:200])
    # classifier + monitor as one torch module (the service's torch backend on a bank with
    # a fused graph): every score on the device, one copy back per output. The monitor
    # comes from the bank, or from a state file written beforehand (torch + numpy only)
    from conceptguard.monitor_graph import FusedMonitoredClassifier, MonitorGraph, NotFusable

    graph = None
    if monitor is not None:
        try:
            graph = MonitorGraph(monitor)
            notes.append("monitor graph from the bank")
        except NotFusable as exc:
            notes.append(f"the bank's monitor does not fuse: {exc}"[:200])
    elif args.monitor_state is not None:
        graph = MonitorGraph.from_state(*read_safetensors(args.monitor_state))
        notes.append(f"monitor graph from {args.monitor_state.name}")
    if graph is None:
        notes.append("`+ monitor` rows skipped: no fusable monitor from the bank or "
                     "--monitor-state")
    else:
        fused = FusedMonitoredClassifier(module, graph).eval()
        runtimes["torch cpu + monitor"] = torch_runner("cpu", fused)
        if cuda:
            runtimes["torch cuda + monitor"] = torch_runner("cuda", fused)
            if args.compile:  # CUDA graphs through torch.compile, where they pay
                for name, m in (("torch cuda compiled", module),
                                ("torch cuda + monitor compiled", fused)):
                    try:
                        runtimes[name] = torch_runner("cuda", m, compiled=True)
                    except Exception as exc:  # no compiler toolchain: say so, go on
                        notes.append(f"{name} skipped ({type(exc).__name__}: {exc})"[:200])

    results: dict[str, dict] = {}
    for batch in batches:
        x = rng.random((batch, c, s, s), dtype=np.float32)
        # interleaved rounds: every runtime timed once per round, seconds apart, so that a
        # drift of the machine's speed hits them alike; the median round per runtime
        rounds: dict[str, list[dict]] = {name: [] for name in runtimes}
        for _ in range(ROUNDS):
            for name, fn in runtimes.items():
                rounds[name].append(timed(lambda fn=fn, x=x: fn(x), batch,
                                          args.seconds / ROUNDS))
        row = {name: median_round(r) for name, r in rounds.items()}
        if monitor is not None:
            o = runtimes["torch cpu"](x)  # type: ignore[operator]
            logits, feats, concepts = o.logits, o.features, o.concepts
            row["scoring (numpy)"] = timed(
                lambda lo=logits, f=feats, co=concepts: score(monitor, lo, f, co), batch,
                args.seconds)
            for name in list(row):  # graph + scoring, the monitored request's compute
                if name != "scoring (numpy)" and "+ monitor" not in name:
                    g, sc = row[name]["images_per_s"], row["scoring (numpy)"]["images_per_s"]
                    row[name]["with_scoring_images_per_s"] = round(1 / (1 / g + 1 / sc), 1)
        for name in [n for n in rounds if " + monitor" in n]:
            base = rounds.get(name.replace(" + monitor", ""))
            if base is not None:  # the monitor's cost on the same device, same batch: the
                # median of the rounds' own ratios
                row[name]["monitor_overhead"] = round(float(np.median(
                    [b["images_per_s"] / m["images_per_s"]
                     for b, m in zip(base, rounds[name], strict=True)])) - 1, 4)
        results[f"batch_{batch}"] = row
        print(f"batch {batch}: " + ", ".join(f"{k} {v['images_per_s']}/s"
                                             for k, v in row.items()), flush=True)

    http = None
    if args.http:
        try:
            http = http_path(args.bank, "cuda" if cuda else "cpu", max(args.seconds * 3, 2.0))
            print("HTTP path: " + json.dumps(http), flush=True)
        except ImportError as exc:
            notes.append(f"HTTP path skipped: the service's dependencies are missing ({exc})")
        except RuntimeError as exc:
            notes.append(f"HTTP path failed: {exc}"[:300])
    report = {"info": info, "notes": notes, "results": results, "http": http,
              "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if cuda and not args.no_docs:
        write_docs(report)
    return 0


def write_docs(report: dict) -> None:
    info = report["info"]
    names = sorted({n for row in report["results"].values() for n in row})
    lines = [START, "",
             f"Measured {report['when']} on {info['gpu']} (torch {info['torch']}, CUDA "
             f"{info['torch_cuda']}; onnxruntime {info.get('onnxruntime', 'absent')}, "
             f"session providers {info.get('ort_session_providers', '-')}; "
             f"{info['cpus']} CPUs) by `python benchmarks/gpu.py`. Images/s of the serving "
             "graph (classifier + concept projection); in brackets: with the monitor's "
             "numpy scoring step added, or, for `+ monitor` rows (classifier and monitor "
             "as one torch module), the monitor's overhead over the same runtime without "
             "it. Random inputs, demo bank.", "",
             "| runtime | " + " | ".join(report["results"]) + " |",
             "|---" * (len(report["results"]) + 1) + "|"]
    for name in names:
        cells = []
        for row in report["results"].values():
            v = row.get(name)
            if v is None:
                cells.append("-")
            elif "monitor_overhead" in v:
                cells.append(f"{v['images_per_s']:,.0f} ({v['monitor_overhead']:+.0%})")
            elif "with_scoring_images_per_s" in v:
                cells.append(f"{v['images_per_s']:,.0f} ({v['with_scoring_images_per_s']:,.0f})")
            else:
                cells.append(f"{v['images_per_s']:,.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    http = report.get("http")
    if http:
        rt = http["runtime"]
        runs = [f"{k.removeprefix('clients_')} client(s): {v['requests_per_s']:,.0f} "
                f"requests/s, p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms"
                for k, v in http.items() if k.startswith("clients_")]
        lines += ["", f"HTTP path (`conceptguard serve`, backend {rt['backend']} on "
                      f"{rt['device']}, graph {rt['graph']}; `POST /v1/classify`, one PNG per "
                      "request, Python client threads on the same machine): "
                      + "; ".join(runs) + "."]
    if report["notes"]:
        lines += ["", "Notes: " + "; ".join(report["notes"])]
    lines += ["", END]
    text = DOCS.read_text()
    block = "\n".join(lines)
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## GPU (benchmarks/gpu.py)\n\n" + block + "\n"
    DOCS.write_text(text)
    print(f"wrote the table into {DOCS}")


if __name__ == "__main__":
    raise SystemExit(main())
