"""Several workers are one service (issue 8, item 6): a SIGTERM drains the in-flight
requests of every worker, a reload reaches every worker before it answers, the queue-depth
gauge forgets a killed worker, and nothing is left in /tmp. Real ``conceptguard serve
--workers 2`` processes."""

from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.batch_metrics import FLUSH_S
from tests.conftest import (
    ADMIN_TOKEN,
    REPO,
    encode_png,
    launch_server,
    metric_sum,
    serving_pids,
    wait_ready,
)

pytestmark = pytest.mark.slow  # multi-worker servers, a worker killed

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _workers(pid: int) -> list[int]:
    """The uvicorn worker processes of the supervisor ``pid``: its spawned children (not
    multiprocessing's resource tracker, which it starts first)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    workers = []
    for child in (int(p) for p in text.split()):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
        except OSError:  # it exited meanwhile
            pass
    return workers


def _images(n: int, seed: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    rng = np.random.default_rng(seed)
    return [("files", (f"{i}.png", encode_png(rng.integers(0, 256, (28, 28), np.uint8)),
                       "image/png")) for i in range(n)]


def _tmp_dirs(folder: Path) -> set[str]:
    return set(glob.glob(os.path.join(folder, "conceptguard-prom-*")))


def test_two_workers_drain_reload_and_clean_up(tmp_path: Path, demo_bank_dir: Path) -> None:
    root = tmp_path / "banks"
    shutil.copytree(demo_bank_dir, root / "demo")
    shutil.copytree(demo_bank_dir, root / "v2")
    # the server's own temporary folder: another test's server (on the other xdist worker)
    # may make its conceptguard-prom-* folder in the shared /tmp meanwhile
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    srv = launch_server(tmp_path / "logs", bank=root / "demo", workers=2, use_cli=True,
                        settings={"admin_token": ADMIN_TOKEN, "banks_root": root,
                                  "max_wait_ms": 20}, extra_env={"TMPDIR": str(tmp)})
    try:
        wait_ready(srv)
        assert len(_tmp_dirs(tmp)) == 1  # the CLI's multiprocess folder, in this TMPDIR
        deadline = time.monotonic() + 120
        while len(_workers(srv.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        with srv.client(timeout=120) as c:
            # wait_ready waited for both workers to serve (one bank_info per pid)
            assert len(serving_pids(c.get("/metrics").text)) == 2
            # ---- a reload reaches every worker before it answers
            resp = c.post("/v1/bank/reload", json={"path": "v2"}, headers=AUTH)
            assert resp.status_code == 200, resp.text
            workers = resp.json()["workers"]
            assert workers["workers"] == 2 and workers["all_serving"], workers
            paths = set()
            for _ in range(40):  # fresh connections spread over both workers
                r = httpx.get(f"{srv.url}/v1/bank", headers={"Connection": "close"}, timeout=30)
                paths.add(r.json()["path"])
            assert paths == {"v2"}, paths
            assert metric_sum(c.get("/metrics").text, "conceptguard_bank_reloads_total",
                              result="success") == 1

        # ---- SIGTERM while requests are in flight: every one of them is answered
        n = 24
        batch = _images(16, 0)

        def call(i: int) -> int | str:
            try:
                r = httpx.post(f"{srv.url}/v1/classify", files=batch, timeout=120,
                               headers={"Connection": "close"})
                return r.status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            # bursts until a scrape sees requests in the queues (a fast machine may answer a
            # whole burst between two scrapes); earlier bursts are answered in full
            for _ in range(20):
                futures = [pool.submit(call, i) for i in range(n)]
                queued = False
                while not queued and not all(f.done() for f in futures):
                    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
                    queued = metric_sum(text, "conceptguard_queue_depth") > 0
                if queued:
                    break
                assert [f.result() for f in futures] == [200] * n
            assert queued, "no scrape saw a request in the queues: the drain would prove nothing"
            # the whole process group, as `docker stop` through a shell or an init does: every
            # worker gets SIGTERM from there and again from the supervisor
            os.killpg(srv.process.pid, signal.SIGTERM)
            results = [f.result() for f in futures]
        srv.process.wait(timeout=60)
        print(f"drain: {results.count(200)} answered, {results.count(503)} refused, "
              f"{n - results.count(200) - results.count(503)} failed of {n}")
        answered = [r for r in results if r == 200]
        refused = [r for r in results if r == 503]  # came in after the drain began
        assert len(answered) + len(refused) == n, results
        assert answered, results
    finally:
        srv.stop()
    assert not _tmp_dirs(tmp), "a conceptguard-prom-* folder was left in the temporary folder"


def test_queue_depth_forgets_a_killed_worker(tmp_path: Path) -> None:
    mp = tmp_path / "prom"
    mp.mkdir()
    srv = launch_server(tmp_path / "logs", workers=2, use_cli=True,
                        settings={"max_batch_size": 1},
                        extra_env={"PROMETHEUS_MULTIPROC_DIR": str(mp)})
    try:
        wait_ready(srv)
        batch = _images(32, 1)

        stop = threading.Event()

        def load(_: int) -> list[int | str]:
            """Requests one after another until ``stop``: the queue stays busy however fast
            the machine is."""
            out: list[int | str] = []
            while not stop.is_set():
                try:
                    out.append(httpx.post(f"{srv.url}/v1/classify", files=batch, timeout=60,
                                          headers={"Connection": "close"}).status_code)
                except httpx.HTTPError as exc:
                    out.append(type(exc).__name__)
            return out

        deadline = time.monotonic() + 60
        while len(_workers(srv.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        victim = _workers(srv.process.pid)[0]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(load, i) for i in range(16)]
            try:
                seen = False
                while not seen and time.monotonic() < deadline:
                    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
                    seen = metric_sum(text, "conceptguard_queue_depth") > 0
                assert seen, "the queue never held a request: the kill would prove nothing"
                os.kill(victim, signal.SIGKILL)
            finally:
                stop.set()
            answered = [r for f in futures for r in f.result()]
        assert 200 in answered, answered[:20]
        # the supervisor restarts the worker; the dead one's gauge must not linger
        wait_ready(srv)
        assert victim not in _workers(srv.process.pid)
        # the other worker writes its depth at its next metrics flush (within FLUSH_S)
        deadline = time.monotonic() + 3 * FLUSH_S + 2.0
        text = httpx.get(f"{srv.url}/metrics", timeout=30).text
        while metric_sum(text, "conceptguard_queue_depth") != 0 \
                and time.monotonic() < deadline:
            time.sleep(0.1)
            text = httpx.get(f"{srv.url}/metrics", timeout=30).text
        assert metric_sum(text, "conceptguard_queue_depth") == 0, text
        assert not glob.glob(str(mp / f"gauge_live*_{victim}.db"))
    finally:
        srv.stop()


def test_an_exited_process_not_yet_reaped_counts_as_dead() -> None:
    # a worker killed a moment ago is a zombie until its supervisor reaps it: its live
    # gauges (queue depth, bank info) must go at once, not after the reaping
    from service.shared_state import process_alive

    child = subprocess.Popen(["true"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_bytes().rpartition(b")")[2].split()[0] != b"Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        assert not process_alive(child.pid)  # exited, not reaped: os.kill(pid, 0) succeeds
    finally:
        child.wait()
    assert not process_alive(child.pid)
    assert process_alive(os.getpid())


def test_a_scrape_skips_a_metrics_file_a_worker_is_still_creating(tmp_path: Path) -> None:
    # a worker creates its file empty and sizes it a moment later; read in that moment it
    # failed the whole scrape (struct.error: a 500 on /metrics)
    code = (
        "from service import metrics\n"
        "from service.metrics_export import render\n"
        "metrics.REQUESTS.labels('/v1/classify', '200').inc(3)\n"
        "open(r'%s', 'wb').close()\n"  # another worker's file, created this instant
        "body, _ = render()\n"
        "print(body.decode())\n"
    ) % (tmp_path / "counter_999999.db")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60,
                         env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert metric_sum(out.stdout, "conceptguard_requests_total", endpoint="/v1/classify",
                      status="200") == 3
