"""Connection hygiene (issue 8, item 5): idle, Slowloris and stalled-body connections are
closed, and a crowd of idle sockets cannot lock clients out. A real server started with
``conceptguard serve`` (its protocol class), raw sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, launch_server, wait_ready

HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 1
MAX_CONNECTIONS = 40
IDLE_SOCKETS = 150  # well over the cap


@pytest.fixture(scope="module", params=["httptools", "h11"])
def guarded(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The same guard on either HTTP parser (``CONCEPTGUARD_HTTP_PARSER``)."""
    srv = launch_server(tmp_path_factory.mktemp("guarded"), use_cli=True, settings={
        "header_timeout_s": HEADER_TIMEOUT_S, "body_timeout_s": BODY_TIMEOUT_S,
        "keep_alive_timeout_s": 1, "max_connections": MAX_CONNECTIONS,
        "http_parser": request.param})
    try:
        yield wait_ready(srv)
    finally:
        srv.stop()


def _connect(srv: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=30)


def _closed_by_server(sock: socket.socket, limit_s: float) -> bytes:
    """Read until the server closes (b'' or a reset); what it sent. Bounded by
    ``limit_s`` so a broken server fails the test instead of hanging it."""
    sock.settimeout(limit_s)
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    return got


def test_many_idle_connections_do_not_lock_clients_out(guarded: ServerProcess) -> None:
    idle = [_connect(guarded) for _ in range(IDLE_SOCKETS)]
    try:
        time.sleep(0.2)
        for _ in range(5):  # fresh clients are still served, each on a new connection
            resp = httpx.get(f"{guarded.url}/v2/health/ready", timeout=10,
                             headers={"Connection": "close"})
            assert resp.status_code == 200
        closed = 0
        for sock in idle:  # the cap closed the longest-idle ones
            sock.setblocking(False)
            try:
                closed += sock.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= IDLE_SOCKETS - MAX_CONNECTIONS
    finally:
        for sock in idle:
            sock.close()


def test_idle_and_slowloris_connections_are_closed(guarded: ServerProcess) -> None:
    with _connect(guarded) as idle, _connect(guarded) as slow:
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # never finishes
        assert _closed_by_server(idle, 30 * HEADER_TIMEOUT_S) == b""
        got = _closed_by_server(slow, 30 * HEADER_TIMEOUT_S)
        assert b"200 OK" not in got


def test_a_stalled_body_is_answered_408_and_closed(guarded: ServerProcess) -> None:
    with _connect(guarded) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b"\x89PNG" + b"\x00" * 60)
        got = _closed_by_server(sock, 30 * BODY_TIMEOUT_S)
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
        assert b"timeout" in got


def test_keep_alive_connections_are_reused_then_closed(guarded: ServerProcess) -> None:
    with httpx.Client(base_url=guarded.url, timeout=10) as c:
        for _ in range(3):
            assert c.get("/v2/health/live").status_code == 200
    with _connect(guarded) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        got = _closed_by_server(sock, 30.0)  # answered, then closed after keep-alive
        assert got.startswith(b"HTTP/1.1 200"), got[:200]


def test_settings_are_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    for name in ("CONCEPTGUARD_HEADER_TIMEOUT_S", "CONCEPTGUARD_BODY_TIMEOUT_S",
                 "CONCEPTGUARD_KEEP_ALIVE_TIMEOUT_S", "CONCEPTGUARD_MAX_CONNECTIONS",
                 "CONCEPTGUARD_DECODE_CONCURRENCY", "CONCEPTGUARD_MAX_JSON_DEPTH",
                 "CONCEPTGUARD_BANKS_ROOT", "CONCEPTGUARD_DRAIN_TIMEOUT_S",
                 "CONCEPTGUARD_HTTP_PARSER"):
        assert name in doc, name


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_sigterm_lets_a_request_head_in_progress_finish(parser: str, tmp_path: Path) -> None:
    """A SIGTERM while a request head is half sent: the request is still answered, the
    connection is closed after the answer (``_closed_by_server`` returns only on a close),
    then the server exits; an idle connection is closed at once."""
    srv = wait_ready(launch_server(tmp_path, use_cli=True, settings={"http_parser": parser}))
    try:
        with _connect(srv) as partial, _connect(srv) as idle:
            partial.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.3)
            os.killpg(srv.process.pid, signal.SIGTERM)
            assert _closed_by_server(idle, 15.0) == b""
            time.sleep(0.3)
            partial.sendall(b"\r\n")
            got = _closed_by_server(partial, 15.0)
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        assert got.endswith(b'{"live":true}'), got[-200:]
        # uvicorn re-raises the signal it handled once it has shut down
        assert srv.process.wait(timeout=30) in (0, -signal.SIGTERM), srv.log_tail()
    finally:
        srv.stop()
