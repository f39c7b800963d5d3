"""A real Prometheus scrapes the service; queries on its HTTP API agree with the service's
own counts. Metrics stay correct with several uvicorn workers (multiprocess mode)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.batch_metrics import FLUSH_S
from tests.conftest import (
    ServerProcess,
    die_with_parent,
    encode_png,
    free_port,
    metric_samples,
    metric_sum,
)

pytestmark = pytest.mark.slow  # a real Prometheus scrapes real servers

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
REJECT_RATIO = ('sum(conceptguard_predictions_total{decision="reject"}) '
                '/ sum(conceptguard_predictions_total)')
REJECT_RATE_RATIO = ("sum(rate(conceptguard_rejections_total[1m])) "
                     "/ sum(rate(conceptguard_predictions_total[1m]))")


@contextlib.contextmanager
def running_prometheus(port_to_scrape: int, folder: Path,
                       rule_files: tuple[Path, ...] = (),
                       evaluation_interval: str = "1s") -> Iterator[str]:
    """Prometheus scraping 127.0.0.1:``port_to_scrape`` every second (and evaluating
    ``rule_files`` every ``evaluation_interval``); yields its base URL."""
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"{PROMETHEUS} is not installed")
    port = free_port()
    config = folder / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": evaluation_interval},
        "rule_files": [str(f) for f in rule_files],
        "scrape_configs": [{
            "job_name": "conceptguard", "scrape_interval": "1s", "scrape_timeout": "900ms",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{port_to_scrape}"]}],
        }],
    }))
    log = folder / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            pytest.fail(f"prometheus not ready:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@pytest.fixture
def prometheus(server: ServerProcess, tmp_path: Path) -> Iterator[str]:
    """Prometheus scraping the session server every second; yields its base URL."""
    with running_prometheus(server.port, tmp_path) as url:
        yield url


def query(prom: str, expr: str) -> float | None:
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5.0)
    resp.raise_for_status()
    body = resp.json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_sees_the_reject_ratio(server: ServerProcess, prometheus: str,
                                          fashion_mnist_test: Any) -> None:
    rng = np.random.default_rng(0)
    pngs = [encode_png(im) for im in fashion_mnist_test.images[100:108]]
    pngs += [encode_png(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(8)]
    pngs += [encode_png(np.full((28, 28), 255, np.uint8)), encode_png(np.zeros((28, 28),
                                                                               np.uint8))]
    with server.client() as c:
        rejected = sum(c.post("/v1/classify", files={"file": ("x.png", p, "image/png")}
                              ).json()["reject"] for p in pngs)
        text = c.get("/metrics").text
    total = metric_sum(text, "conceptguard_predictions_total")
    rejects = metric_sum(text, "conceptguard_predictions_total", decision="reject")
    assert total >= len(pngs) and rejects >= rejected
    assert rejected >= 1, "expected noise / blank images to be rejected"
    assert metric_sum(text, "conceptguard_rejections_total") == rejects

    deadline = time.monotonic() + 30
    seen = None
    while time.monotonic() < deadline:  # until a scrape after the last request is stored
        seen = query(prometheus, "sum(conceptguard_predictions_total)")
        if seen == total:
            break
        time.sleep(0.5)
    assert seen == total, f"prometheus saw {seen} predictions, the service counted {total}"
    ratio = query(prometheus, REJECT_RATIO)
    assert ratio is not None and ratio == pytest.approx(rejects / total, abs=1e-9)
    assert query(prometheus, 'up{job="conceptguard"}') == 1.0
    rate_ratio = query(prometheus, REJECT_RATE_RATIO)
    if rate_ratio is not None and not math.isnan(rate_ratio):
        assert 0.0 <= rate_ratio <= 1.0


def _per_pid_requests(multiproc_dir: Path, endpoint: str) -> Counter[str]:
    """Requests counted by each worker process, read from its own multiprocess file."""
    from prometheus_client.mmap_dict import MmapedDict

    counts: Counter[str] = Counter()
    for path in multiproc_dir.glob("counter_*.db"):
        pid = path.stem.split("_")[-1]
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample, labels, _ = json.loads(key)
            if sample == "conceptguard_requests_total" and labels.get("endpoint") == endpoint:
                counts[pid] += int(value)
    return counts


async def _spread(url: str, png: bytes, n: int) -> list[tuple[int, str]]:
    """``n`` requests, each on its own connection, eight at a time: (status, body) each."""
    sem = asyncio.Semaphore(8)

    async def one() -> tuple[int, str]:
        async with sem, httpx.AsyncClient(base_url=url, timeout=60.0) as ac:
            r = await ac.post("/v1/classify", files={"file": ("x.png", png, "image/png")},
                              headers={"Connection": "close"})
            return r.status_code, "" if r.status_code == 200 else r.text

    return await asyncio.gather(*(one() for _ in range(n)))


def test_metrics_count_requests_from_every_worker(multiworker_server: ServerProcess,
                                                  sample_png: bytes) -> None:
    mp = Path(multiworker_server.env["PROMETHEUS_MULTIPROC_DIR"])
    sent = 0
    for _ in range(5):  # the kernel picks the worker; keep going until both served some
        answers = asyncio.run(_spread(multiworker_server.url, sample_png, 16))
        failed = [a for a in answers if a[0] != 200]
        assert not failed, f"{failed}\n{multiworker_server.log_tail()}"
        sent += 16
        if len(_per_pid_requests(mp, "/v1/classify")) >= 2:
            break
    # a worker counts a request once its answer is sent: the last counts may trail the
    # answers the client already has by a moment
    deadline = time.monotonic() + 10.0
    per_pid = _per_pid_requests(mp, "/v1/classify")
    while sum(per_pid.values()) < sent and time.monotonic() < deadline:
        time.sleep(0.05)
        per_pid = _per_pid_requests(mp, "/v1/classify")
    assert len(per_pid) >= 2, f"only one worker served requests: {per_pid}"
    assert sum(per_pid.values()) == sent
    # a scrape flushes its own worker's queued batches; the other worker's are written by
    # its flusher within FLUSH_S: the sums reach every answer sent within that bound
    deadline = time.monotonic() + 3 * FLUSH_S + 2.0
    with multiworker_server.client() as c:
        while True:
            text = c.get("/metrics").text
            if (metric_sum(text, "conceptguard_predictions_total") == sent
                    or time.monotonic() > deadline):
                break
            time.sleep(0.1)
    assert metric_sum(text, "conceptguard_requests_total", endpoint="/v1/classify",
                      status="200") == sent
    assert metric_sum(text, "conceptguard_predictions_total") == sent
    assert metric_sum(text, "conceptguard_trust_score_count") == sent
    info = [v for _, v in metric_samples(text, "conceptguard_bank_info")]
    assert len(info) >= 2 and all(v == 1.0 for v in info)  # liveall: one per worker
