"""A short overload and a short soak (issue 8, item 2 and the flat-memory promise): under
more concurrent requests than the queue holds, every answer is 200 or 503 with Retry-After;
rounds of mixed valid and hostile requests leave the worker's memory flat. Real server,
real HTTP; the throughput target itself is a benchmark (benchmarks/overload.py)."""

from __future__ import annotations

import base64
import concurrent.futures
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ServerProcess, encode_png, launch_server, metric_sum, wait_ready

pytestmark = pytest.mark.slow  # load and soak runs against real servers

MIB = 1 << 20


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = launch_server(tmp_path_factory.mktemp("overload"),
                        settings={"queue_size": 8, "max_batch_size": 4, "max_wait_ms": 20})
    try:
        yield wait_ready(srv)
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = launch_server(tmp_path_factory.mktemp("one-slot"),
                        settings={"queue_size": 1, "max_batch_size": 1})
    try:
        yield wait_ready(srv)
    finally:
        srv.stop()


def _rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    assert m is not None
    return int(m.group(1)) * 1024


def test_overload_sheds_with_retry_after(small_queue: ServerProcess) -> None:
    rng = np.random.default_rng(0)
    files = [("files", (f"{i}.png", encode_png(rng.integers(0, 256, (28, 28), np.uint8)),
                        "image/png")) for i in range(4)]

    def call(_: int) -> tuple[int, str | None]:
        r = httpx.post(f"{small_queue.url}/v1/classify", files=files, timeout=60)
        return r.status_code, r.headers.get("retry-after")

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, range(96)))
    statuses = {s for s, _ in answers}
    assert statuses <= {200, 503}, answers
    assert all(ra == "1" for s, ra in answers if s == 503), answers
    assert any(s == 200 for s, _ in answers) and any(s == 503 for s, _ in answers)
    text = httpx.get(f"{small_queue.url}/metrics", timeout=10).text
    shed = sum(1 for s, _ in answers if s == 503)
    assert metric_sum(text, "conceptguard_queue_full_total") == shed
    assert metric_sum(text, "conceptguard_queue_depth") == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_soak_memory_stays_flat(small_queue: ServerProcess, sample_png: bytes) -> None:
    d = httpx.get(f"{small_queue.url}/v1/bank", timeout=10).json()["classifier"]["feature_dim"]
    rng = np.random.default_rng(1)
    hostile = [b"", b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 300, np.uint8)),
               b"[" * 1000, b'{"images": ["%%%"]}', sample_png[:50]]

    def round_trip(c: httpx.Client) -> None:
        ok = c.post("/v1/classify", json={"images": [base64.b64encode(sample_png).decode()] * 3})
        assert ok.status_code in (200, 503), ok.text
        mon = c.post("/v1/monitor", json={"features": rng.normal(size=(4, d)).tolist()})
        assert mon.status_code == 200, mon.text
        for body in hostile:
            r = c.post("/v1/classify", content=body,
                       headers={"Content-Type": "application/json" if body[:1] in b"[{"
                                else "image/png"})
            assert 400 <= r.status_code < 500, r.text

    pid = small_queue.process.pid
    with small_queue.client() as c:
        for _ in range(5):
            round_trip(c)
        before = _rss(pid)
        for _ in range(40):
            round_trip(c)
        after = _rss(pid)
    print(f"soak: RSS {before / MIB:.0f} -> {after / MIB:.0f} MiB over 280 requests")
    assert after - before <= 32 * MIB


def _big_png(side: int = 5000) -> bytes:
    import io

    from PIL import Image

    img = np.zeros((side, side, 4), np.uint8)
    img[..., 3] = 255
    img[side // 3: 2 * side // 3, :, :3] = 180
    buf = io.BytesIO()
    Image.fromarray(img, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _status_without_body(srv: ServerProcess) -> bytes:
    """POST /v1/classify announcing a 5 MB body and sending none of it: the response, head
    and body (b'' when the server waited for the body instead of answering). Read until
    the announced body is in: the server may write head and body in separate segments."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 5000000\r\n\r\n")
        data = b""
        try:  # the head and the body may arrive in separate segments: read to the end
            while chunk := sock.recv(4096):
                data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
        except TimeoutError:
            pass
        return data


def test_a_request_that_will_be_shed_is_refused_before_its_body(
        one_slot: ServerProcess) -> None:
    """queue_size 1: while one big image is being decoded, a request that announces a body
    and sends none of it is answered 503 + Retry-After at once (not after reading it)."""
    png = _big_png()
    for _attempt in range(3):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(lambda: httpx.post(
                f"{one_slot.url}/v1/classify", content=png, timeout=120,
                headers={"Content-Type": "image/png"}).status_code)
            head = b""
            deadline = time.monotonic() + 60
            while not first.done() and time.monotonic() < deadline:
                text = httpx.get(f"{one_slot.url}/metrics", timeout=10).text
                if metric_sum(text, "conceptguard_queue_depth") >= 1:
                    head = _status_without_body(one_slot)
                    break
            assert first.result() == 200
        if head:
            assert head.startswith(b"HTTP/1.1 503"), head[:200]
            assert b"retry-after: 1" in head.lower() and b"queue_full" in head
            return
    pytest.fail("the big image was never observed in the queue")
