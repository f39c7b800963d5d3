"""``/metrics``: the exposition text, and the label sets created at 0.

Works with several uvicorn workers: when ``PROMETHEUS_MULTIPROC_DIR`` is set (before
:mod:`service.metrics` is imported), every process writes its values to files there and
``/metrics`` aggregates them with :class:`prometheus_client.multiprocess.MultiProcessCollector`.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)

from service.batch_metrics import flush_all
from service.metrics import (
    BAD_REQUESTS,
    BANK_RELOADS,
    ERROR_CODES,
    INITIAL_STATUSES,
    QUEUE_FULL,
    REQUEST_DURATION,
    REQUESTS,
    SINK_EVENTS,
    SINK_PAIR_RESULTS,
    SINK_PAIRS,
    SINK_RESULTS,
)
from service.shared_state import process_alive

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def initialise(app: Any) -> None:
    """Create every labelled counter with a known label set at 0, so that ``increase()``
    and ``rate()`` see the first event (a series born at 1 hides it)."""
    for code in ERROR_CODES:
        BAD_REQUESTS.labels(code)
    for result in ("success", "failure"):
        BANK_RELOADS.labels(result)
    endpoints = set(_route_paths(getattr(app, "routes", ())))
    endpoints.add("unmatched")
    for endpoint in sorted(endpoints):
        for status in INITIAL_STATUSES:
            REQUESTS.labels(endpoint, status)
        REQUEST_DURATION.labels(endpoint)
    QUEUE_FULL.inc(0)
    for kind in ("request", "response"):
        for result in SINK_RESULTS:
            SINK_EVENTS.labels(kind, result)
    for result in SINK_PAIR_RESULTS:
        SINK_PAIRS.labels(result)


def _route_paths(routes: Any) -> list[str]:
    out = []
    for route in routes:
        path = getattr(route, "path", None)
        if isinstance(path, str):
            out.append(path)
        nested = getattr(getattr(route, "original_router", None), "routes", None)
        if nested is not None:  # an included router (prefix-free here)
            out.extend(_route_paths(nested))
    return out


def _forget_dead_workers(folder: str) -> None:
    """Drop the live gauges of workers that died without cleaning up (SIGKILL, OOM)."""
    import re

    for path in glob.glob(os.path.join(folder, "gauge_live*_*.db")):
        m = re.search(r"_(\d+)\.db$", path)
        if m is None:
            continue
        pid = int(m.group(1))
        if not process_alive(pid):
            multiprocess.mark_process_dead(pid, folder)


class _WorkerFilesCollector(multiprocess.MultiProcessCollector):
    """prometheus_client's collector over the workers' files, less the empty ones: a worker
    creates a file empty and sizes it a moment later, and read in that moment it fails the
    whole scrape (``struct.error``). An empty file holds no sample yet."""

    def collect(self):  # type: ignore[no-untyped-def]
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    files.append(path)
            except OSError:  # removed meanwhile (a dead worker's live gauges)
                pass
        return self.merge(files, accumulate=True)


def render() -> tuple[bytes, str]:
    """The exposition text for ``/metrics`` (aggregated over workers in multiprocess mode)."""
    flush_all()
    if folder := multiprocess_dir():
        _forget_dead_workers(folder)
        registry = CollectorRegistry()
        _WorkerFilesCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead() -> None:
    """Drop this worker's live gauges (queue depth, bank info) at shutdown."""
    flush_all()
    if multiprocess_dir():
        multiprocess.mark_process_dead(os.getpid())
