"""A lone request runs on the event loop's thread (``CONCEPTGUARD_INLINE_MAX_MS``), and
concurrent ones do not. A real server started with ``conceptguard serve`` (its HTTP
protocol counts the requests in progress), and /proc on its worker's threads."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import (
    ServerProcess,
    launch_server,
    wait_ready,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                reason="reads per-thread CPU time from /proc")

LONE_REQUESTS = 400
LARGE_REQUESTS = 120
CLIENTS = 6
CONCURRENT_REQUESTS = 80


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # a bound far above a lone run's 1 ms or so: on a busy test machine a run's wall time
    # can pass the default 2 ms, which would (rightly) send it to the inference thread
    srv = launch_server(tmp_path_factory.mktemp("inline"), use_cli=True,
                        settings={"threads": 1, "inline_max_ms": 50})
    try:
        yield wait_ready(srv)
    finally:
        srv.stop()


def thread_ticks(pid: int) -> tuple[int, int]:
    """CPU clock ticks (user + system) of the process's main thread, and of all its other
    threads together."""
    main = others = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that ended meanwhile
            continue
        ticks = int(fields[11]) + int(fields[12])
        if int(task.name) == pid:
            main += ticks
        else:
            others += ticks
    return main, others


def test_lone_requests_run_on_the_loop_thread_with_the_same_answers(
        cli_server: ServerProcess, server: ServerProcess, sample_png: bytes) -> None:
    """Sequential requests are each alone: after the first (timed on the inference thread)
    their work runs on the main thread, so the other threads take almost no CPU (the
    inference thread would take about as much as the main one). The answers equal those of
    the pooled server, whose plain uvicorn protocol does not count requests (every batch on
    the inference thread there)."""
    png = sample_png
    headers = {"content-type": "image/png"}
    pid = cli_server.process.pid  # one worker: uvicorn serves in the CLI's process
    with cli_server.client() as c, server.client() as ref:
        first = c.post("/v1/classify", content=png, headers=headers)
        want = ref.post("/v1/classify", content=png, headers=headers).json()
        main0, others0 = thread_ticks(pid)
        for _ in range(LONE_REQUESTS):
            r = c.post("/v1/classify", content=png, headers=headers)
            assert r.status_code == 200, r.text
        main1, others1 = thread_ticks(pid)
    got = r.json()
    assert first.status_code == 200
    for key in ("label", "class_index", "reject"):
        assert got[key] == want[key]
    # the same graph on the same input: float32 rounding of trust (a value in [0, 1]),
    # plus the float64 map's slope, far under 1e-6
    assert abs(got["trust"] - want["trust"]) <= 1e-6
    assert got["heads"] == pytest.approx(want["heads"], abs=1e-6)
    main_ticks, other_ticks = main1 - main0, others1 - others0
    # hundreds of requests at half a millisecond or more each: tens of ticks of work
    assert main_ticks >= 10, (main_ticks, other_ticks)
    assert other_ticks * 4 <= main_ticks, (
        f"other threads took {other_ticks} ticks against the main thread's {main_ticks}: "
        "lone requests did not run inline")


def test_requests_in_progress_together_are_not_alone(cli_server: ServerProcess,
                                                     sample_png: bytes) -> None:
    """Requests in progress at once on several connections are not alone (the connections
    count each as its head arrives): under six concurrent clients the batch work stays on
    the inference thread. Were each taken for a lone one (the batcher alone cannot tell:
    the others have not taken their queue places yet), it would all run on the main
    thread, as the lone requests above do, and batches would shrink to one image."""
    headers = {"content-type": "image/png"}
    pid = cli_server.process.pid

    def client_loop(_: int) -> None:
        with cli_server.client() as c:
            for _ in range(CONCURRENT_REQUESTS):
                r = c.post("/v1/classify", content=sample_png, headers=headers)
                assert r.status_code == 200, r.text

    main0, others0 = thread_ticks(pid)
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client_loop, range(CLIENTS)))
    main1, others1 = thread_ticks(pid)
    main_ticks, other_ticks = main1 - main0, others1 - others0
    assert main_ticks >= 10, (main_ticks, other_ticks)
    # measured about 1.3x the main thread's on 2 cores; all inline would leave about 0
    assert other_ticks * 3 >= main_ticks, (
        f"other threads took {other_ticks} ticks against the main thread's {main_ticks}: "
        "concurrent requests ran inline")


def test_a_large_png_runs_on_the_inference_thread(cli_server: ServerProcess) -> None:
    """A lone request whose PNG declares far more pixels than the input (512x512 here, a
    few kilobytes) is decoded and run on the inference thread: its decode time is not
    bounded by the input size, and the loop must not wait for it."""
    buf = io.BytesIO()
    Image.fromarray((np.arange(512 * 512) % 251).astype(np.uint8).reshape(512, 512)).save(
        buf, format="PNG")
    png = buf.getvalue()
    headers = {"content-type": "image/png"}
    pid = cli_server.process.pid
    with cli_server.client() as c:
        assert c.post("/v1/classify", content=png, headers=headers).status_code == 200
        main0, others0 = thread_ticks(pid)
        for _ in range(LARGE_REQUESTS):
            r = c.post("/v1/classify", content=png, headers=headers)
            assert r.status_code == 200, r.text
        main1, others1 = thread_ticks(pid)
    main_ticks, other_ticks = main1 - main0, others1 - others0
    # the decode of 262,144 pixels and the run on the inference thread, the HTTP work on
    # the main one: the other threads take at least half as much as the main one
    assert other_ticks * 2 >= main_ticks, (main_ticks, other_ticks)
    assert other_ticks >= 5, (main_ticks, other_ticks)


def test_lone_request_needs_the_request_counted_and_no_other_in_progress() -> None:
    """:func:`service.middleware.lone_request`: true only in the task of a request its
    connection counted (:func:`mark_counted`, per task), and only while the count is 1."""
    from service.admission_hold import AdmissionGate
    from service.middleware import lone_request, mark_counted

    g = AdmissionGate(8)
    alone = lone_request(g)

    async def counted() -> bool:
        mark_counted()
        return alone()

    async def uncounted() -> bool:
        return alone()

    async def main() -> list[bool]:
        got = [await asyncio.create_task(counted()), await asyncio.create_task(uncounted())]
        g.started()  # a second request in progress
        try:
            got.append(await asyncio.create_task(counted()))
        finally:
            g.finished()
        return got

    g.started()  # the request under test
    assert asyncio.run(main()) == [True, False, False]
