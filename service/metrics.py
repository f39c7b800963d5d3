"""Prometheus metrics of the service (prefix ``conceptguard_``, base units, bounded labels).

Works with several uvicorn workers: when ``PROMETHEUS_MULTIPROC_DIR`` is set (before this
module is imported), every process writes its values to files there and ``/metrics``
aggregates them with :class:`prometheus_client.multiprocess.MultiProcessCollector`.
Label values come from the bank (model name, classes, concepts) and from fixed sets
(endpoint templates, status codes, error codes), never from request contents.

Recording is per batch (one increment per label set and bucket touched). The per-concept
series (a count, a sum and a moving average for each of the bank's concepts: over a hundred
values) are accumulated in numpy and flushed to Prometheus at most every
:data:`CONCEPT_FLUSH_S` seconds, by a daemon thread, on every scrape of this process and at
shutdown: at batch 1 writing them per batch cost ~0.15 ms, a tenth of a request.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from conceptguard.scoring import Scores

disable_created_metrics()

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(9))  # 1 .. 256
EMA_ALPHA = 0.01  # per input: the moving average spans roughly the last 100 inputs
REJECT_REASON_LABELS = {"misclassification-like": "misclassification_like",
                        "adversarial-like": "adversarial_like",
                        "unfamiliar": "unfamiliar"}

REQUESTS = Counter("conceptguard_requests", "HTTP requests by route template and status code",
                   ["endpoint", "status"])
REQUEST_DURATION = Histogram("conceptguard_request_duration_seconds",
                             "HTTP request duration by route template", ["endpoint"],
                             buckets=LATENCY_BUCKETS)
PREDICTIONS = Counter("conceptguard_predictions", "Scored inputs by predicted class and decision",
                      ["model", "class", "decision"])
REJECTIONS = Counter("conceptguard_rejections", "Rejected inputs by the kind of defect suspected",
                     ["model", "reason"])
PAPER_RULE_REJECTIONS = Counter("conceptguard_paper_rule_rejections",
                                "Inputs the paper's heatmap rule would reject", ["model"])
TRUST = Histogram("conceptguard_trust_score", "Calibrated trust score per input", ["model"],
                  buckets=SCORE_BUCKETS)
HEAD_SCORE = Histogram("conceptguard_head_score", "Defect-head probability per input",
                       ["model", "head"], buckets=SCORE_BUCKETS)
QUEUE_WAIT = Histogram("conceptguard_queue_wait_seconds",
                       "Time an image waited in the batch queue", buckets=LATENCY_BUCKETS)
INFERENCE_DURATION = Histogram("conceptguard_inference_duration_seconds",
                               "Runtime call plus scoring, per batch", buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("conceptguard_batch_size", "Images per runtime call",
                       buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("conceptguard_queue_depth", "Images admitted and not yet answered",
                    multiprocess_mode="livesum")
CONCEPT_SCORE = Summary("conceptguard_concept_score",
                        "Standardised concept scores of served inputs (mean = sum / count)",
                        ["model", "concept"])
CONCEPT_SCORE_MEAN = Gauge("conceptguard_concept_score_mean",
                           f"Exponential moving average (alpha {EMA_ALPHA} per input) of the "
                           "standardised concept scores", ["model", "concept"],
                           multiprocess_mode="mostrecent")
BANK_INFO = Gauge("conceptguard_bank_info",
                  "The bank being served and the runtime serving it (value 1); provider: the "
                  "execution provider the session actually uses",
                  ["model", "bank_id", "vlm", "classifier_hash", "schema_version", "backend",
                   "device", "provider"],
                  multiprocess_mode="liveall")
BAD_REQUESTS = Counter("conceptguard_bad_requests", "Client errors (4xx) by error code",
                       ["code"])
QUEUE_FULL = Counter("conceptguard_queue_full", "Requests refused because the queue was full")
BANK_RELOADS = Counter("conceptguard_bank_reloads", "Bank reloads by result", ["result"])


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


# Every error code the service answers with (the label set of bad_requests_total).
ERROR_CODES = ("empty", "not_an_image", "corrupt", "invalid_base64", "invalid_json", "no_file",
               "invalid_multipart", "unauthorized", "forbidden", "reload_disabled",
               "not_found", "unknown_model", "unknown_version", "method_not_allowed",
               "timeout", "too_large", "too_many_pixels", "too_many_images",
               "unsupported_mode", "unsupported_format", "unsupported_media_type",
               "invalid_request", "invalid_tensor", "invalid_bank", "http_error")
# Statuses pre-created for every route (others appear when first answered).
INITIAL_STATUSES = ("200", "400", "401", "403", "404", "408", "413", "415", "422", "500",
                    "503")


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
    import glob
    import re

    for path in glob.glob(os.path.join(folder, "gauge_live*_*.db")):
        m = re.search(r"_(\d+)\.db$", path)
        if m is None:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, folder)
        except PermissionError:
            pass


def render() -> tuple[bytes, str]:
    """The exposition text for ``/metrics`` (aggregated over workers in multiprocess mode)."""
    flush_all()
    if folder := multiprocess_dir():
        _forget_dead_workers(folder)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead() -> None:
    """Drop this worker's live gauges (queue depth, bank info) at shutdown."""
    flush_all()
    if multiprocess_dir():
        multiprocess.mark_process_dead(os.getpid())


def observe_request(endpoint: str, status: int, seconds: float) -> None:
    REQUESTS.labels(endpoint, str(status)).inc()
    REQUEST_DURATION.labels(endpoint).observe(seconds)


def bad_request(code: str) -> None:
    BAD_REQUESTS.labels(code).inc()


def reload_result(ok: bool) -> None:
    BANK_RELOADS.labels("success" if ok else "failure").inc()


# ---------------------------------------------------------------- per-batch observations


def observe_many(histogram: Any, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, done once per batch: the bucket counts are
    computed with numpy and each non-empty bucket is incremented once, the sum once (the
    exported series and values are those of one ``observe`` per value, up to the rounding
    of the sum). ``histogram``: a labelled child (or an unlabelled histogram). Works with
    every value class of prometheus_client, multiprocess mode included: it only calls
    ``inc`` on the histogram's own values."""
    observe_rows([histogram], np.asarray(values, dtype=np.float64).reshape(1, -1))


def observe_rows(histograms: Sequence[Any], rows: np.ndarray) -> None:
    """:func:`observe_many` for several histograms with the same buckets at once: row ``h``
    of ``rows`` (H x N) holds the values observed by ``histograms[h]``."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.size == 0:
        return
    bounds = _bounds(histograms[0])
    nb = len(bounds)
    # observe() counts a value in the first bucket whose bound is >= it; NaN in none
    index = np.searchsorted(bounds, rows, side="left")
    flat = (index + nb * np.arange(len(histograms))[:, None])[index < nb]
    counts = np.bincount(flat, minlength=nb * len(histograms)).tolist()
    sums = rows.sum(axis=1).tolist()
    for h, histogram in enumerate(histograms):
        if len(histogram._upper_bounds) != nb:
            raise ValueError("observe_rows needs histograms with the same buckets")
        histogram._raise_if_not_observable()
        histogram._sum.inc(sums[h])
        buckets = histogram._buckets
        for i in range(nb):
            c = counts[h * nb + i]
            if c:
                buckets[i].inc(c)


_BOUNDS: dict[tuple[float, ...], np.ndarray] = {}


def _bounds(histogram: Any) -> np.ndarray:
    key = tuple(histogram._upper_bounds)
    got = _BOUNDS.get(key)
    if got is None:
        got = _BOUNDS[key] = np.asarray(key, dtype=np.float64)
    return got


def observe_summary_many(summary: Any, count: int, total: float) -> None:
    """``count`` observations summing to ``total`` on a Summary child, in two increments."""
    if count:
        summary._count.inc(count)
        summary._sum.inc(total)


class QueueObserver:
    """Batcher hooks -> queue depth, queue wait, batch size, queue-full counter."""

    def depth(self, pending: int) -> None:
        QUEUE_DEPTH.set(pending)

    def batch(self, size: int, waits_s: Sequence[float]) -> None:
        BATCH_SIZE.observe(size)
        observe_many(QUEUE_WAIT, np.asarray(waits_s, dtype=np.float64))

    def queue_full(self) -> None:
        QUEUE_FULL.inc()


class ModelMetrics:
    """Per-bank metric children, resolved once (label lookups are off the request path)."""

    def __init__(self, model: str, classes: Sequence[str], concepts: Sequence[str],
                 info: dict[str, str]):
        self.model = model
        self.info = info
        self._predictions = [(PREDICTIONS.labels(model, c, "accept"),
                              PREDICTIONS.labels(model, c, "reject")) for c in classes]
        self._rejections = {kind: REJECTIONS.labels(model, label)
                            for kind, label in REJECT_REASON_LABELS.items()}
        self._paper = PAPER_RULE_REJECTIONS.labels(model)
        self._trust = TRUST.labels(model)
        self._head_mis = HEAD_SCORE.labels(model, "misclassification")
        self._head_anom = HEAD_SCORE.labels(model, "anomaly")
        self._head_adv = HEAD_SCORE.labels(model, "adversarial")
        self._head_unf = HEAD_SCORE.labels(model, "unfamiliar")
        self._scored = (self._trust, self._head_mis, self._head_anom, self._head_adv,
                        self._head_unf)
        self._concepts = [CONCEPT_SCORE.labels(model, c) for c in concepts]
        self._concept_means = [CONCEPT_SCORE_MEAN.labels(model, c) for c in concepts]
        self._ema: np.ndarray | None = None
        self._pending_n = 0  # concept observations not yet flushed, and their sums
        self._pending_sums = np.zeros(len(concepts), dtype=np.float64)
        self._lock = threading.Lock()
        _LIVE.add(self)
        _start_flusher()

    def activate(self) -> None:
        BANK_INFO.labels(self.model, *self._info_values()).set(1)

    def deactivate(self) -> None:
        BANK_INFO.labels(self.model, *self._info_values()).set(0)

    def _info_values(self) -> tuple[str, ...]:
        i = self.info
        return (i["bank_id"], i["vlm"], i["classifier_hash"], i["schema_version"],
                i.get("backend", ""), i.get("device", ""), i.get("provider", ""))

    def record(self, scores: Scores, concepts: np.ndarray) -> None:
        """Count and observe one scored batch (called from the inference thread): one
        increment per label set and bucket touched, not per input."""
        n_classes = len(self._predictions)
        preds = np.asarray(scores.predictions, dtype=np.intp)
        rejects = np.asarray(scores.reject, dtype=bool)
        decisions = np.bincount(preds * 2 + rejects, minlength=2 * n_classes)
        for k in np.flatnonzero(decisions).tolist():
            self._predictions[k // 2][k % 2].inc(int(decisions[k]))
        for reason, count in collections.Counter(scores.reason).items():
            child = self._rejections.get(reason)
            if child is not None:
                child.inc(count)
        n_paper = int(np.count_nonzero(scores.paper_rule_reject))
        if n_paper:
            self._paper.inc(n_paper)
        observe_rows(self._scored, np.stack([scores.trust, scores.p_misclassification,
                                             scores.p_anomaly, scores.p_adversarial,
                                             scores.p_unfamiliar]))
        self._record_concepts(concepts)

    def _record_concepts(self, concepts: np.ndarray) -> None:
        if concepts.size == 0:
            return
        values = np.asarray(concepts, dtype=np.float64)
        n = len(values)
        # EMA over the batch in one step: ema_n = (1-a)^n ema_0 + sum_i a (1-a)^(n-i) x_i
        decay = (1.0 - EMA_ALPHA) ** np.arange(n - 1, -1, -1, dtype=np.float64)
        with self._lock:
            if self._ema is None:
                self._ema = values[0].copy()
            self._ema = (1.0 - EMA_ALPHA) ** n * self._ema + EMA_ALPHA * (decay @ values)
            self._pending_n += n
            self._pending_sums += values.sum(axis=0)

    def flush(self) -> None:
        """Write the concept observations accumulated since the last flush (and the moving
        averages) to their Prometheus series."""
        with self._lock:
            n, sums = self._pending_n, self._pending_sums
            if not n:
                return
            self._pending_n, self._pending_sums = 0, np.zeros_like(sums)
            means = self._ema.tolist() if self._ema is not None else []
        for child, total in zip(self._concepts, sums.tolist(), strict=True):
            observe_summary_many(child, n, total)
        for child, m in zip(self._concept_means, means, strict=True):
            child.set(m)


CONCEPT_FLUSH_S = 1.0  # the per-concept series lag the served inputs by at most this
_LIVE: weakref.WeakSet[ModelMetrics] = weakref.WeakSet()
_FLUSHER: list[threading.Thread] = []
_FLUSHER_LOCK = threading.Lock()


def flush_all() -> None:
    """Flush every live bank's accumulated concept observations (see the module docstring)."""
    for m in list(_LIVE):
        m.flush()


def _flush_forever() -> None:
    while True:
        time.sleep(CONCEPT_FLUSH_S)
        flush_all()


def _start_flusher() -> None:
    """One daemon thread per process that flushes every CONCEPT_FLUSH_S (it sleeps between)."""
    with _FLUSHER_LOCK:
        if not _FLUSHER or not _FLUSHER[0].is_alive():
            t = threading.Thread(target=_flush_forever, name="conceptguard-metrics-flush",
                                 daemon=True)
            t.start()
            _FLUSHER[:] = [t]
