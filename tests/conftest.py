"""Shared test fixtures: the demo bank, Fashion-MNIST test images, PNG encoding, and real
uvicorn servers started as subprocesses on free loopback ports (no mocks)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO_BANK = REPO / "banks" / "demo"
ADMIN_TOKEN = "test-admin-token"
READY_TIMEOUT_S = 120.0


# ---------------------------------------------------------------- helpers


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this process (a server binds its HTTP
    and gRPC ports seconds later: the kernel may offer the same free port twice)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def encode_png(array: np.ndarray) -> bytes:
    """uint8 ``(H, W)`` / ``(H, W, 1)`` (mode L) or ``(H, W, 3)`` (RGB) -> lossless PNG."""
    a = np.asarray(array, dtype=np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    img = Image.fromarray(a, "L" if a.ndim == 2 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode_image(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric from Prometheus exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out.append((dict(sample.labels), float(sample.value)))
    return out


def metric_sum(text: str, name: str, **labels: str) -> float:
    return sum(v for lab, v in metric_samples(text, name)
               if all(lab.get(k) == want for k, want in labels.items()))


@dataclass
class ServerProcess:
    """A uvicorn server (its own process group) serving the app on 127.0.0.1."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    grpc_port: int = 0  # the Open Inference Protocol gRPC port (0: none)
    workers: int = 1

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30.0), **kwargs)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


def die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, even if it is killed before
    its fixture finalisers run (Linux ``PR_SET_PDEATHSIG``; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PDEATHSIG


def server_env(bank: Path, settings: dict[str, Any] | None = None,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CONCEPTGUARD_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["CONCEPTGUARD_BANK"] = str(bank)
    for key, value in (settings or {}).items():
        env[f"CONCEPTGUARD_{key.upper()}"] = str(value)
    env.update(extra or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def launch_server(log_dir: Path, *, bank: Path = DEMO_BANK,
                  settings: dict[str, Any] | None = None, workers: int = 1,
                  extra_env: dict[str, str] | None = None, use_cli: bool = False
                  ) -> ServerProcess:
    """Start a server subprocess; does not wait (see :func:`wait_ready`)."""
    port = free_port()
    env = server_env(bank, settings, extra_env)
    # every server gets its own gRPC port on loopback (8001 would collide between servers)
    env.setdefault("CONCEPTGUARD_GRPC_PORT", str(free_port()))
    env.setdefault("CONCEPTGUARD_GRPC_HOST", "127.0.0.1")
    if use_cli:
        cmd = [sys.executable, "-m", "offline.cli", "serve", "--bank", str(bank), "--host",
               "127.0.0.1", "--port", str(port), "--workers", str(workers),
               "--log-level", "warning"]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)
    return ServerProcess(f"http://127.0.0.1:{port}", port, proc, log_path, env,
                         int(env["CONCEPTGUARD_GRPC_PORT"]), workers)


def serving_pids(metrics_text: str) -> set[str]:
    """The worker processes that serve their bank: the live ``conceptguard_bank_info``
    series at 1, one per process id (several workers share a multiprocess metrics folder;
    the CLI makes one when none is given)."""
    return {lab.get("pid", "") for lab, v in metric_samples(metrics_text,
                                                             "conceptguard_bank_info")
            if v == 1}


def _serving_now(server: ServerProcess) -> set[str]:
    """:func:`serving_pids` of one scrape; none while a scrape fails (a worker starting
    may be creating its metrics files as another worker reads them)."""
    r = httpx.get(f"{server.url}/metrics", timeout=5.0)
    if r.status_code != 200:
        return set()
    try:
        return serving_pids(r.text)
    except ValueError:
        return set()


def wait_ready(server: ServerProcess, timeout: float = READY_TIMEOUT_S) -> ServerProcess:
    """Poll ``/v2/health/ready`` until 200, and with several workers until every one of them
    serves its bank (a ready answer comes from whichever worker took the connection); fail
    with the server log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"server exited with {server.process.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=2.0).status_code == 200 \
                    and (server.workers <= 1 or len(_serving_now(server)) >= server.workers):
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def ready_app_client(app: Any, timeout: float = 120.0) -> Iterator[Any]:
    """A Starlette ``TestClient`` on ``app`` (its lifespan run), once ``/v2/health/ready``
    answers 200 (the bank loads in the background)."""
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        deadline = time.monotonic() + timeout
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the in-process app never became ready"
            time.sleep(0.05)
        yield client


def start_server(log_dir: Path, **kwargs: Any) -> ServerProcess:
    server = launch_server(log_dir, **kwargs)
    try:
        return wait_ready(server)
    except BaseException:
        server.stop()
        raise


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def demo_bank_dir() -> Path:
    assert (DEMO_BANK / "manifest.json").is_file(), "the shipped demo bank is missing"
    return DEMO_BANK


@pytest.fixture(scope="session")
def demo_manifest(demo_bank_dir: Path) -> dict[str, Any]:
    """The demo bank's manifest as plain JSON (no torch import)."""
    return json.loads((demo_bank_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def demo_bank(demo_bank_dir: Path):  # -> conceptguard.bank.Bank
    """The demo bank, loaded and validated by the core."""
    from conceptguard.bank import load_bank

    return load_bank(demo_bank_dir)


@pytest.fixture(scope="session")
def fashion_mnist_test():  # -> conceptguard.data.ArrayDataset
    """The official Fashion-MNIST test set (skips when the dataset is not installed)."""
    from conceptguard.data import DataSpec, load_source

    try:
        _, test = load_source(DataSpec())
    except (FileNotFoundError, OSError, ValueError) as exc:
        pytest.skip(f"Fashion-MNIST is not available: {exc}")
    return test


@pytest.fixture(scope="session")
def test_scores_sample(demo_bank_dir: Path) -> dict[str, Any]:
    path = demo_bank_dir / "report" / "test_scores_sample.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def sample_png() -> bytes:
    """A 28x28 grayscale PNG (a smooth gradient)."""
    x = np.linspace(0, 255, 28, dtype=np.float64)
    return encode_png(np.add.outer(x, x[::-1]).clip(0, 255).astype(np.uint8))


# Servers with special settings, launched in parallel with the main one as soon as a test
# that needs them is collected (server start-up is mostly imports: single-threaded).
AUX_SERVERS: dict[str, dict[str, Any]] = {
    # no batching, a one-image queue: concurrent requests overflow it
    "queue_full_server": {"settings": {"max_batch_size": 1, "queue_size": 1}},
    # two workers via the CLI, metrics aggregated through PROMETHEUS_MULTIPROC_DIR
    "multiworker_server": {"workers": 2, "use_cli": True, "multiproc": True},
}


class ServerPool:
    """Named servers for the session: launched early, waited for on first use. ``banks``
    is the main server's banks root (CONCEPTGUARD_BANKS_ROOT), holding a copy of the demo
    bank as ``demo``; reload tests put their banks there."""

    def __init__(self, root: Path):
        self.root = root
        self.servers: dict[str, ServerProcess] = {}
        self.multiproc_dirs: dict[str, Path] = {}
        self.banks = root / "banks"
        if not (self.banks / "demo").is_dir():
            shutil.copytree(DEMO_BANK, self.banks / "demo")

    def launch(self, name: str, **config: Any) -> None:
        if name in self.servers:
            return
        config = dict(config)
        if config.pop("multiproc", False):
            mp = self.root / f"{name}-prometheus"
            mp.mkdir(parents=True, exist_ok=True)
            self.multiproc_dirs[name] = mp
            config["extra_env"] = {**config.get("extra_env", {}),
                                   "PROMETHEUS_MULTIPROC_DIR": str(mp)}
        self.servers[name] = launch_server(self.root / name, **config)

    def get(self, name: str, **config: Any) -> ServerProcess:
        self.launch(name, **config)
        return wait_ready(self.servers[name])

    def stop_all(self) -> None:
        for srv in self.servers.values():
            srv.stop()


@pytest.fixture(scope="session")
def server_pool(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    # launched together up front, except under pytest-xdist: a worker collects every test but
    # runs only its share, so there each server starts on first use
    wanted = set() if os.environ.get("PYTEST_XDIST_WORKER") else {
        name for item in request.session.items
        for name in getattr(item, "fixturenames", ()) if name in AUX_SERVERS}
    try:
        for name in sorted(wanted):
            pool.launch(name, **AUX_SERVERS[name])
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
def server(server_pool: ServerPool) -> ServerProcess:
    """The session's server on the demo bank: batching on, reload enabled."""
    return server_pool.get("main", bank=server_pool.banks / "demo",
                           settings={"admin_token": ADMIN_TOKEN, "max_wait_ms": 2,
                                     "banks_root": server_pool.banks})


@pytest.fixture(scope="session")
def banks_root(server_pool: ServerPool) -> Path:
    """The main server's banks root (reloads are confined to it)."""
    return server_pool.banks


@pytest.fixture(scope="session")
def queue_full_server(server_pool: ServerPool) -> ServerProcess:
    return server_pool.get("queue_full_server", **AUX_SERVERS["queue_full_server"])


@pytest.fixture(scope="session")
def multiworker_server(server_pool: ServerPool) -> ServerProcess:
    return server_pool.get("multiworker_server", **AUX_SERVERS["multiworker_server"])


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start extra servers (settings as keyword arguments); all are stopped afterwards."""
    started: list[ServerProcess] = []

    def make(**kwargs: Any) -> ServerProcess:
        srv = launch_server(tmp_path / "logs", **kwargs)
        started.append(srv)
        return wait_ready(srv)

    try:
        yield make
    finally:
        for srv in started:
            srv.stop()
