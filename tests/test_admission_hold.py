"""Holding saturated keep-alive connections (issue 22, goodput under a client that ignores
Retry-After): the gate's bookkeeping (fast), and against real ``conceptguard serve``
processes: more keep-alive connections than capacity, re-sending at once, get 200s and no
503 while a server with holding off sheds; a hold ends after CONCEPTGUARD_ADMISSION_HOLD_S."""

from __future__ import annotations

import concurrent.futures
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.admission_hold import AdmissionGate, is_queued_request
from tests.conftest import ServerProcess, encode_png, launch_server, metric_sum, wait_ready

MIB = 1 << 20


# ------------------------------------------------------------------ the gate (fast)


class _Conn:
    def __init__(self, gate: AdmissionGate, name: str, released: list[str]) -> None:
        self.gate, self.name, self.released = gate, name, released

    def release_hold(self) -> None:
        self.released.append(self.name)
        self.gate.started()  # as the protocol does: the released request is in progress


def test_gate_releases_oldest_first_one_per_free_place() -> None:
    gate = AdmissionGate(capacity=2)
    released: list[str] = []
    gate.started()
    gate.started()
    assert gate.at_capacity()
    conns = [_Conn(gate, n, released) for n in "abc"]
    for c in conns:
        gate.hold(c)
    gate.wake()
    assert released == [] and gate.held == 3  # still at capacity: nobody released
    gate.finished()
    assert released == ["a"] and gate.in_progress == 2
    assert gate.forget(conns[1]) and not gate.forget(conns[1])  # b timed out or closed
    gate.finished()
    assert released == ["a", "c"] and gate.held == 0
    gate.finished()
    gate.finished()
    gate.finished()
    assert gate.in_progress == 0  # never negative


def test_gate_follows_the_bound_batcher() -> None:
    gate = AdmissionGate(capacity=100)
    full = [True]
    gate.bind(lambda: full[0], 100)
    released: list[str] = []
    gate.hold(_Conn(gate, "a", released))
    gate.wake()
    assert released == [] and gate.at_capacity()
    full[0] = False
    gate.wake()
    assert released == ["a"]
    full[0] = True
    gate.unbind()  # the app stopped: only the count of requests in progress remains
    assert not gate.at_capacity()


@pytest.mark.parametrize(("head", "queued"), [
    (b"POST /v1/classify HTTP/1.1\r\n", True),
    (b"POST /v1/classify/ HTTP/1.1\r\n", True),
    (b"POST /v1/classify?x=1 HTTP/1.1\r\n", True),
    (b"POST /v2/models/demo/infer HTTP/1.1\r\n", True),
    (b"POST /v2/models/demo/versions/3/infer HTTP/1.1\r\n", True),
    (b"GET /v1/classify HTTP/1.1\r\n", False),
    (b"POST /v1/monitor HTTP/1.1\r\n", False),
    (b"POST /v1/classifyx HTTP/1.1\r\n", False),
    (b"POST /v2/models/a/b/infer HTTP/1.1\r\n", False),
    (b"POST /v1/clas", False),  # a head split before the path ends is not held
])
def test_queued_request_lines(head: bytes, queued: bool) -> None:
    assert is_queued_request(head) is queued


# ------------------------------------------------------------------ real servers (slow)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    base = {"queue_size": 2, "max_batch_size": 2, "max_wait_ms": 5}
    launched = {
        "hold": launch_server(tmp_path_factory.mktemp("hold"), use_cli=True,
                              settings={**base, "admission_hold_s": 1.0}),
        "no_hold": launch_server(tmp_path_factory.mktemp("no-hold"), use_cli=True,
                                 settings={**base, "admission_hold_s": 0}),
    }
    try:
        yield {k: wait_ready(v) for k, v in launched.items()}
    finally:
        for srv in launched.values():
            srv.stop()


def _rss(pid: int) -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert m is not None
    return int(m.group(1)) * 1024


def _burst(srv: ServerProcess, png: bytes, connections: int = 12, each: int = 6
           ) -> list[int]:
    """``connections`` keep-alive clients, each answered once, then all re-sending at once
    ``each`` times with no Retry-After handling: the statuses."""
    clients = [httpx.Client(base_url=srv.url, timeout=60,
                            limits=httpx.Limits(max_connections=1)) for _ in range(connections)]
    headers = {"Content-Type": "image/png"}
    try:
        for c in clients:  # one answer each: the connections are now keep-alive
            assert c.post("/v1/classify", content=png, headers=headers).status_code == 200
        start = threading.Barrier(connections)

        def hammer(c: httpx.Client) -> list[int]:
            start.wait()
            return [c.post("/v1/classify", content=png, headers=headers).status_code
                    for _ in range(each)]

        with concurrent.futures.ThreadPoolExecutor(connections) as pool:
            return [s for out in pool.map(hammer, clients) for s in out]
    finally:
        for c in clients:
            c.close()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_keep_alive_connections_over_capacity_are_held_not_shed(
        servers: dict[str, ServerProcess]) -> None:
    png = _image()
    held, shed = servers["hold"], servers["no_hold"]
    before = _rss(held.process.pid)
    statuses = _burst(held, png)
    assert statuses == [200] * len(statuses), statuses  # 12 connections, queue of 2
    text = httpx.get(f"{held.url}/metrics", timeout=10).text
    assert metric_sum(text, "conceptguard_queue_full_total") == 0
    assert metric_sum(text, "conceptguard_queue_depth") == 0
    assert _rss(held.process.pid) - before <= 32 * MIB
    # the same burst with holding off: the queue of 2 sheds (the storm the hold avoids)
    statuses = _burst(shed, png)
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    text = httpx.get(f"{shed.url}/metrics", timeout=10).text
    assert metric_sum(text, "conceptguard_queue_full_total") == statuses.count(503)


@pytest.mark.slow
def test_a_hold_ends_after_the_admission_hold(servers: dict[str, ServerProcess]) -> None:
    srv = servers["hold"]
    png = _image()
    # two requests whose bodies never finish: both places in progress, no CPU used
    stalled = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Content-Length: 1000\r\n\r\n" + png[:10])
        stalled.append(s)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/v2/health/live").status_code == 200  # keep-alive now
            time.sleep(0.2)  # the stalled heads are parsed
            t0 = time.perf_counter()
            r = c.post("/v1/classify", content=png, headers={"Content-Type": "image/png"})
            waited = time.perf_counter() - t0
        # held for the 1 s hold, then the ordinary admission: the batcher has room -> 200
        assert r.status_code == 200, r.text
        assert 0.9 <= waited < 10, waited
    finally:
        for s in stalled:
            s.close()


def _image() -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)
    return encode_png(rng.integers(0, 256, (28, 28), np.uint8))
