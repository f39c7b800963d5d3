"""What each batch did, recorded once per batch: the per-bank series
(:class:`ModelMetrics`: predictions, rejections, trust and head histograms, the per-concept
series) and the queue (:class:`QueueObserver`, the batcher's hooks).

A bank's series are written off the request path: the data plane only queues each answered
request's ``(scores, concepts)`` (:attr:`ModelMetrics.record` is the queue's own ``append``,
a builtin: no Python code of this module runs for it), and :meth:`ModelMetrics.flush` observes
everything queued since the last flush as one batch (one increment per label set and bucket
touched: :func:`observe_many`, :func:`observe_rows`), at most every :data:`FLUSH_S` seconds,
by a daemon thread, on every scrape of this process (so a scrape counts every answer sent
before it) and at shutdown. At batch 1 observing per batch cost ~0.03 ms, writing the
per-concept series (a count, a sum and a moving average for each of the bank's concepts)
~0.15 ms; once a second, for every request of that second, it costs a few microseconds per
request. The batcher's queue series (:class:`QueueObserver`: batch size, queue wait, queue
depth) are written the same way: the batcher appends each batch's ``(size, waits)`` to a
queue, and the flush observes them and sets the depth to the batcher's pending count.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from conceptguard.scoring import Scores
from service.metrics import (
    BANK_INFO,
    BATCH_SIZE,
    CONCEPT_SCORE,
    CONCEPT_SCORE_MEAN,
    CONCEPT_SCORE_PARTS,
    EMA_ALPHA,
    ESTIMATED_ACCURACY,
    FEEDBACK,
    FEEDBACK_CORRECT,
    FEEDBACK_LABELS,
    HEAD_SCORE,
    PAPER_RULE_REJECTIONS,
    PREDICTIONS,
    QUEUE_DEPTH,
    QUEUE_FULL,
    QUEUE_WAIT,
    REJECT_REASON_LABELS,
    REJECTIONS,
    TRUST,
    TRUST_SUM,
)

T = TypeVar("T")

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
    if rows.shape[1] == 1:  # a batch of one: one value per histogram, no numpy per bucket
        _observe_column(histograms, rows[:, 0].tolist())
        return
    bounds = _bounds(histograms[0])
    nb = len(bounds)
    # observe() counts a value in the first bucket whose bound is >= it; NaN in none
    index = np.searchsorted(bounds, rows, side="left")
    flat = (index + nb * np.arange(len(histograms))[:, None])[index < nb]
    counts = np.bincount(flat, minlength=nb * len(histograms))
    touched = np.flatnonzero(counts)  # only the buckets the batch touched are written
    sums = rows.sum(axis=1).tolist()
    for h, histogram in enumerate(histograms):
        if len(histogram._upper_bounds) != nb:
            raise ValueError("observe_rows needs histograms with the same buckets")
        histogram._raise_if_not_observable()
        histogram._sum.inc(sums[h])
    for k, c in zip(touched.tolist(), counts[touched].tolist(), strict=True):
        histograms[k // nb]._buckets[k % nb].inc(c)


def _observe_column(histograms: Sequence[Any], values: list[float]) -> None:
    """One value per histogram, as ``observe`` counts it: the first bucket whose bound is
    >= the value (the last bound is +Inf), none for NaN; the value added to the sum."""
    nb = len(histograms[0]._upper_bounds)
    for histogram, v in zip(histograms, values, strict=True):
        bounds = histogram._upper_bounds
        if len(bounds) != nb:
            raise ValueError("observe_rows needs histograms with the same buckets")
        histogram._raise_if_not_observable()
        histogram._sum.inc(v)
        if v == v:  # not NaN
            histogram._buckets[bisect.bisect_left(bounds, v)].inc(1)


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


def ema_update(start: float, values: np.ndarray, alpha: float = EMA_ALPHA) -> float:
    """The exponential moving average after ``values`` (in order), from ``start``."""
    n = len(values)
    if n == 1:
        return (1.0 - alpha) * start + alpha * float(values[0])
    decay = (1.0 - alpha) ** np.arange(n - 1, -1, -1, dtype=np.float64)
    return float((1.0 - alpha) ** n * start + alpha * (decay @ values))


_OBSERVED = ("predictions", "reject", "trust", "paper_rule_reject", "p_misclassification",
             "p_anomaly", "p_adversarial", "p_unfamiliar")


@dataclass(frozen=True)
class _Observed:
    """The fields of :class:`~conceptguard.scoring.Scores` a flush observes, of many
    requests joined (what :meth:`ModelMetrics._observe` reads)."""

    predictions: np.ndarray
    reject: np.ndarray
    trust: np.ndarray
    paper_rule_reject: np.ndarray
    p_misclassification: np.ndarray
    p_anomaly: np.ndarray
    p_adversarial: np.ndarray
    p_unfamiliar: np.ndarray
    reason: list[str]


def _none_pending() -> int:
    return 0


def _take_all(queue: collections.deque[T]) -> list[T]:
    """Everything in ``queue`` now, oldest first, taken out of it (``popleft`` is atomic:
    the request path may append meanwhile, never losing an entry)."""
    taken: list[T] = []
    while True:
        try:
            taken.append(queue.popleft())
        except IndexError:
            return taken


class QueueObserver:
    """Batcher hooks -> queue depth, queue wait, batch size, queue-full counter.

    Off the request path like a bank's series: ``batch`` is the queue's own ``append`` of
    each batch's ``(size, waits)``, and :meth:`flush` (with the banks', see the module
    docstring) observes them and sets the depth gauge to the batcher's pending count at
    that moment (a gauge is only ever read at a scrape, which flushes first)."""

    batch: Callable[[tuple[int, Sequence[float]]], None]

    def __init__(self) -> None:
        self._batches: collections.deque[tuple[int, Sequence[float]]] = collections.deque()
        self.batch = self._batches.append
        self._pending: Callable[[], int] = _none_pending
        self._lock = threading.Lock()
        _LIVE_QUEUES.add(self)
        _start_flusher()

    def watch(self, pending: Callable[[], int]) -> None:
        self._pending = pending

    def queue_full(self) -> None:
        QUEUE_FULL.inc()

    def flush(self) -> None:
        """Observe the batches run since the last flush; the queue depth now."""
        with self._lock:
            batches = _take_all(self._batches)
            if batches:
                sizes = [size for size, _ in batches]
                waits = [w for _, batch_waits in batches for w in batch_waits]
                observe_many(BATCH_SIZE, np.asarray(sizes, dtype=np.float64))
                observe_many(QUEUE_WAIT, np.asarray(waits, dtype=np.float64))
            QUEUE_DEPTH.set(self._pending())


class ModelMetrics:
    """Per-bank metric children, resolved once (label lookups are off the request path).

    ``record((scores, concepts))`` queues the scores of an answered request (see the
    module docstring);
    :meth:`flush` observes what was queued."""

    record: Callable[[tuple[Scores, np.ndarray]], None]

    def __init__(self, model: str, classes: Sequence[str], concepts: Sequence[str],
                 info: dict[str, str], expected_rejection_rate: float | None = None):
        self.model = model
        self.info = info
        self.expected_rejection_rate = expected_rejection_rate
        self._predictions = [(PREDICTIONS.labels(model, c, "accept"),
                              PREDICTIONS.labels(model, c, "reject")) for c in classes]
        self._trust_sums = [(TRUST_SUM.labels(model, c, "accept"),
                             TRUST_SUM.labels(model, c, "reject")) for c in classes]
        for pair in self._trust_sums:  # created at 0 like the predictions they divide
            for child in pair:
                child.inc(0)
        for decision, reason in FEEDBACK_LABELS:
            FEEDBACK.labels(model, decision, reason)
            FEEDBACK_CORRECT.labels(model, decision, reason)
        self._accuracy = (ESTIMATED_ACCURACY.labels(model, "all"),
                          ESTIMATED_ACCURACY.labels(model, "accepted"))
        self._trust_ema: list[float | None] = [None, None]
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
        self._concept_parts = [(CONCEPT_SCORE_PARTS.labels(model, c, "positive"),
                                CONCEPT_SCORE_PARTS.labels(model, c, "negative"))
                               for c in concepts]
        self._ema: np.ndarray | None = None
        self._pending_n = 0  # concept observations not yet flushed, and their sums
        self._pending_sums = np.zeros(len(concepts), dtype=np.float64)
        self._pending_pos = np.zeros(len(concepts), dtype=np.float64)
        self._pending_neg = np.zeros(len(concepts), dtype=np.float64)
        self._lock = threading.Lock()
        # the requests answered since the last flush, in order; appending and popping
        # from both ends of a deque are atomic, so the request path never takes a lock
        self._queued: collections.deque[tuple[Scores, np.ndarray]] = collections.deque()
        self.record = self._queued.append
        _LIVE.add(self)
        _start_flusher()

    def __del__(self) -> None:
        # A bank replaced by a reload (or an operating point) is dropped once its last
        # requests are answered: what they queued is written before it goes.
        try:
            if self._queued:
                self.flush()
        except Exception:  # interpreter shutdown: nothing left to write to
            pass

    def activate(self) -> None:
        """This bank's info series to 1 (its expected rejection rate is published with the
        threshold in use: :func:`service.operating.publish_threshold`)."""
        BANK_INFO.labels(self.model, *self._info_values()).set(1)

    def deactivate(self) -> None:
        self.flush()  # the last batches of a bank that is replaced
        BANK_INFO.labels(self.model, *self._info_values()).set(0)

    def _info_values(self) -> tuple[str, ...]:
        i = self.info
        return (i["bank_id"], i["vlm"], i["classifier_hash"], i["schema_version"],
                i.get("backend", ""), i.get("device", ""), i.get("provider", ""))

    def _drain(self) -> tuple[Scores, np.ndarray] | None:
        """Everything queued so far, in order, as one batch (None: nothing queued)."""
        parts = [p for p in _take_all(self._queued) if len(p[0])]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        # only what _observe reads (not the probabilities, risks or contributions)
        joined = {name: np.concatenate([getattr(p[0], name) for p in parts])
                  for name in _OBSERVED}
        observed = _Observed(reason=[r for p in parts for r in p[0].reason], **joined)
        return (observed,  # type: ignore[return-value]  # the fields of Scores _observe reads
                np.concatenate([np.asarray(p[1], dtype=np.float64) for p in parts]))

    def _observe(self, scores: Scores, concepts: np.ndarray) -> None:
        """Count and observe one batch: one increment per label set and bucket touched, not
        per input."""
        n_classes = len(self._predictions)
        preds = np.asarray(scores.predictions, dtype=np.intp)
        rejects = np.asarray(scores.reject, dtype=bool)
        decisions = np.bincount(preds * 2 + rejects, minlength=2 * n_classes)
        trust = np.asarray(scores.trust, dtype=np.float64)
        trust_sums = np.bincount(preds * 2 + rejects, weights=trust, minlength=2 * n_classes)
        for k in np.flatnonzero(decisions).tolist():
            self._predictions[k // 2][k % 2].inc(int(decisions[k]))
            self._trust_sums[k // 2][k % 2].inc(float(trust_sums[k]))
        self._record_accuracy(trust, ~rejects)
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

    def _record_accuracy(self, trust: np.ndarray, accepted: np.ndarray) -> None:
        """Moving averages of the trust score (all inputs, accepted ones): the per-worker
        estimated accuracy gauge."""
        for i, values in enumerate((trust, trust[accepted])):
            if values.size == 0:
                continue
            ema = self._trust_ema[i]
            self._trust_ema[i] = ema = ema_update(float(values[0]) if ema is None else ema,
                                                  values)
            self._accuracy[i].set(ema)

    def _record_concepts(self, concepts: np.ndarray) -> None:
        """Accumulate the concept scores of a batch (the caller holds ``_lock``)."""
        if concepts.size == 0:
            return
        values = np.asarray(concepts, dtype=np.float64)
        n = len(values)
        if self._ema is None:
            self._ema = values[0].copy()
        if n == 1:  # a batch of one: the same sums without the batch reductions
            total = values[0]
            self._ema = (1.0 - EMA_ALPHA) * self._ema + EMA_ALPHA * total
            positive = np.maximum(total, 0.0)
        else:
            # EMA over the batch in one step: ema_n = (1-a)^n ema_0 + sum_i a (1-a)^(n-i) x_i
            decay = (1.0 - EMA_ALPHA) ** np.arange(n - 1, -1, -1, dtype=np.float64)
            self._ema = (1.0 - EMA_ALPHA) ** n * self._ema + EMA_ALPHA * (decay @ values)
            total = values.sum(axis=0)
            positive = np.maximum(values, 0.0).sum(axis=0)
        self._pending_n += n
        self._pending_sums += total
        self._pending_pos += positive
        # the magnitudes of the negative parts (never below 0: a counter only grows)
        self._pending_neg += np.maximum(positive - total, 0.0)

    def flush(self) -> None:
        """Observe the batches queued since the last flush, in order, and write the concept
        observations accumulated (and the moving averages) to their Prometheus series. One
        flush at a time (the moving averages depend on the order), written before the lock
        is let go: a scrape's flush that finds nothing left to drain (another flush took it)
        waits for those writes instead of rendering without them."""
        with self._lock:
            batch = self._drain()
            if batch is not None:
                self._observe(*batch)
            n, sums = self._pending_n, self._pending_sums
            if not n:
                return
            pos, neg = self._pending_pos, self._pending_neg
            self._pending_n, self._pending_sums = 0, np.zeros_like(sums)
            self._pending_pos, self._pending_neg = np.zeros_like(pos), np.zeros_like(neg)
            means = self._ema.tolist() if self._ema is not None else []
            for child, total in zip(self._concepts, sums.tolist(), strict=True):
                observe_summary_many(child, n, total)
            for (c_pos, c_neg), p, q in zip(self._concept_parts, pos.tolist(), neg.tolist(),
                                            strict=True):
                c_pos.inc(p)
                c_neg.inc(q)
            for child, m in zip(self._concept_means, means, strict=True):
                child.set(m)


FLUSH_S = 1.0  # a bank's series lag the served inputs by at most this (a scrape: none)
_LIVE: weakref.WeakSet[ModelMetrics] = weakref.WeakSet()
_LIVE_QUEUES: weakref.WeakSet[QueueObserver] = weakref.WeakSet()
_FLUSHER: list[threading.Thread] = []
_FLUSHER_LOCK = threading.Lock()


def flush_all() -> None:
    """Flush every live bank's queued batches and every batcher's queue metrics (see the
    module docstring)."""
    for m in list(_LIVE):
        m.flush()
    for q in list(_LIVE_QUEUES):
        q.flush()


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_S)
        flush_all()


def _start_flusher() -> None:
    """One daemon thread per process that flushes every FLUSH_S (it sleeps between)."""
    with _FLUSHER_LOCK:
        if not _FLUSHER or not _FLUSHER[0].is_alive():
            t = threading.Thread(target=_flush_forever, name="conceptguard-metrics-flush",
                                 daemon=True)
            t.start()
            _FLUSHER[:] = [t]
