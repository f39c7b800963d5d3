"""The monitoring series added for dashboards that tell the truth: concept-score parts that
only grow, trust sums by class and decision (estimated accuracy), its moving average, the
bank's expected rejection rate, the queue capacity and the feedback counters."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import REGISTRY

from conceptguard.scoring import Scores
from service import metrics
from service.bank_summary import expected_rejection_rate
from service.batch_metrics import ModelMetrics, ema_update
from service.operating import publish_threshold, retire_model
from tests.tolerance import assert_f32_close


def _scores(n: int, seed: int) -> Scores:
    rng = np.random.default_rng(seed)
    trust = rng.random(n)
    reject = trust < 0.4
    reason = ["unfamiliar" if r else "accepted" for r in reject]
    return Scores(probabilities=rng.random((n, 3)), predictions=rng.integers(0, 3, n),
                  risks={"msp": rng.random(n)}, p_misclassification=rng.random(n),
                  p_anomaly=rng.random(n), p_adversarial=rng.random(n),
                  p_unfamiliar=rng.random(n), trust=trust, reject=reject, reason=reason,
                  paper_rule_reject=trust < 0.2, contributions=rng.random((n, 4)))


def _value(model: str, name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model": model, **labels})


def test_trust_sums_per_class_and_decision_give_the_mean_trust() -> None:
    model = "mon-trust"
    m = ModelMetrics(model, ["a", "b", "c"], ["k0", "k1"], {})
    for cls in "abc":  # created at 0 before any input, so rate() sees the first one
        assert _value(model, "conceptguard_trust_sum_total", **{"class": cls,
                                                                "decision": "accept"}) == 0
    batches = [_scores(40, 1), _scores(25, 2)]
    for s in batches:
        m.record((s, np.zeros((len(s), 2), dtype=np.float32)))
    m.flush()  # both batches observed as one, in order
    trust = np.concatenate([s.trust for s in batches])
    preds = np.concatenate([s.predictions for s in batches])
    reject = np.concatenate([s.reject for s in batches])
    total_sum, total_n = 0.0, 0.0
    for c, cls in enumerate("abc"):
        for decision, flag in (("accept", False), ("reject", True)):
            mask = (preds == c) & (reject == flag)
            got = _value(model, "conceptguard_trust_sum_total", **{"class": cls,
                                                                   "decision": decision})
            assert_f32_close(got, trust[mask].sum(), terms=len(trust), scale=1.0)
            total_sum += got
            total_n += _value(model, "conceptguard_predictions_total",
                              **{"class": cls, "decision": decision})
    # what the recording rule computes: sum of trust / number of predictions
    assert_f32_close(total_sum / total_n, trust.mean(), terms=len(trust), scale=1.0)
    # the per-worker moving averages, over all inputs and over the accepted ones
    want_all = ema_update(float(batches[0].trust[0]), trust)
    accepted = trust[~reject]
    want_acc = ema_update(float(accepted[0]), accepted)
    assert_f32_close(_value(model, "conceptguard_estimated_accuracy", inputs="all"),
                     want_all, terms=len(trust), scale=1.0)
    assert_f32_close(_value(model, "conceptguard_estimated_accuracy", inputs="accepted"),
                     want_acc, terms=len(trust), scale=1.0)
    assert want_acc > want_all  # accepted inputs have the higher trust


def test_ema_update_matches_the_recursive_definition() -> None:
    values = np.linspace(-1.0, 2.0, 57)
    ema = 0.3
    for v in values:
        ema = (1 - metrics.EMA_ALPHA) * ema + metrics.EMA_ALPHA * v
    assert_f32_close(ema_update(0.3, values), ema, terms=len(values))


def test_concept_parts_only_grow_and_give_the_signed_mean() -> None:
    model = "mon-concepts"
    m = ModelMetrics(model, ["a", "b", "c"], ["k0", "k1"], {})
    rng = np.random.default_rng(3)
    s = _scores(30, 3)
    chunks = [rng.normal(-0.3, 1.0, (30, 2)), rng.normal(0.5, 1.0, (30, 2))]
    seen = []
    for values in chunks:
        m.record((s, values.astype(np.float32)))
        m.flush()
        pos = _value(model, "conceptguard_concept_score_parts_total", concept="k0",
                     sign="positive")
        neg = _value(model, "conceptguard_concept_score_parts_total", concept="k0",
                     sign="negative")
        seen.append((pos, neg))
    assert seen[1][0] >= seen[0][0] and seen[1][1] >= seen[0][1]  # monotone: rate() is safe
    x = np.concatenate(chunks).astype(np.float32).astype(np.float64)[:, 0]
    pos, neg = seen[-1]
    assert_f32_close(pos, np.maximum(x, 0).sum(), terms=len(x))
    assert_f32_close(neg, -np.minimum(x, 0).sum(), terms=len(x))
    count = _value(model, "conceptguard_concept_score_count", concept="k0")
    assert count == len(x)
    assert_f32_close((pos - neg) / count, x.mean(), terms=len(x))
    # the signed sum went down in the second chunk's negative values: rate() of it would read
    # a counter reset; the parts never do
    assert_f32_close(_value(model, "conceptguard_concept_score_sum", concept="k0"), x.sum(),
                     terms=len(x))


def test_concept_parts_of_non_negative_scores_stay_at_zero_negative() -> None:
    """Rounding never makes the negative part go below 0 (a counter cannot decrease)."""
    m = ModelMetrics("mon-positive", ["a", "b", "c"], ["k0"], {})
    values = np.full((30, 1), 0.1, dtype=np.float32)  # sums that do not round exactly
    m.record((_scores(30, 5), values))
    m.flush()
    assert _value("mon-positive", "conceptguard_concept_score_parts_total", concept="k0",
                  sign="negative") == 0.0


def test_expected_rejection_rate_comes_from_the_bank_evaluation() -> None:
    assert expected_rejection_rate({"threshold": {"coverage": 0.9109}}) == 1 - 0.9109
    assert expected_rejection_rate({}) is None
    assert expected_rejection_rate({"threshold": {"coverage": "x"}}) is None
    assert expected_rejection_rate({"threshold": {"coverage": 1.5}}) is None
    m = ModelMetrics("mon-expected", ["a"], ["k"], {"bank_id": "b", "vlm": "v",
                                                    "classifier_hash": "h",
                                                    "schema_version": "2"},
                     expected_rejection_rate=0.089)
    m.activate()

    def served(point: dict | None, model: str = "mon-expected") -> SimpleNamespace:
        return SimpleNamespace(model_name=model, metrics=m, operating_point=point,
                               bank=SimpleNamespace(monitor=SimpleNamespace(
                                   calibrated_threshold=0.5)))

    publish_threshold(served(None))
    assert _value("mon-expected", "conceptguard_expected_rejection_rate") == 0.089
    # an operating point: the bank measured no clean rate at its threshold
    publish_threshold(served({"target": "coverage", "value": 0.5}))
    assert math.isnan(_value("mon-expected", "conceptguard_expected_rejection_rate"))
    assert _value("mon-expected", "conceptguard_reject_threshold",
                  target="coverage:0.5") == 0.5
    publish_threshold(served(None))  # back to the bank's own
    assert _value("mon-expected", "conceptguard_expected_rejection_rate") == 0.089
    retire_model("mon-expected")  # a reload to a bank of another name: both series go
    assert _value("mon-expected", "conceptguard_expected_rejection_rate") is None
    assert _value("mon-expected", "conceptguard_reject_threshold", target="bank") is None


def test_queue_capacity_and_feedback_counters() -> None:
    metrics.set_queue_capacity(17)
    assert REGISTRY.get_sample_value("conceptguard_queue_capacity") == 17
    model = "mon-feedback"
    ModelMetrics(model, ["a"], ["k"], {})
    for decision, reason in metrics.FEEDBACK_LABELS:  # every pair exists at 0
        assert _value(model, "conceptguard_feedback_total", decision=decision,
                      reason=reason) == 0
    metrics.feedback(model, "reject", "unfamiliar", correct=False)
    metrics.feedback(model, "reject", "unfamiliar", correct=True)
    metrics.feedback(model, "accept", "accepted", correct=True)
    assert _value(model, "conceptguard_feedback_total", decision="reject",
                  reason="unfamiliar") == 2
    assert _value(model, "conceptguard_feedback_correct_total", decision="reject",
                  reason="unfamiliar") == 1
    assert _value(model, "conceptguard_feedback_correct_total", decision="accept",
                  reason="accepted") == 1


def test_a_flush_that_finds_nothing_waits_for_the_writes_of_one_in_progress(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a scrape flushes before it renders: when the background flusher has just drained the
    # queue, the scrape must still see what that flush writes (else a scrape right after an
    # answer could miss its concept series)
    import threading

    from service import batch_metrics

    m = ModelMetrics("mon-lock", ["a", "b", "c"], ["k0"], {})
    writing, release = threading.Event(), threading.Event()
    real = batch_metrics.observe_summary_many

    def slow(child: object, n: int, total: float) -> None:
        writing.set()
        release.wait(10.0)
        real(child, n, total)

    monkeypatch.setattr(batch_metrics, "observe_summary_many", slow)
    m.record((_scores(10, 7), np.ones((10, 1), dtype=np.float32)))
    background = threading.Thread(target=m.flush)
    background.start()
    assert writing.wait(10.0)  # the background flush drained the queue and is writing
    scrape_done = threading.Event()
    scrape = threading.Thread(target=lambda: (m.flush(), scrape_done.set()))
    scrape.start()
    assert not scrape_done.wait(0.2)  # it waits for the writes in progress
    release.set()
    background.join(10.0)
    scrape.join(10.0)
    assert scrape_done.is_set()
    assert _value("mon-lock", "conceptguard_concept_score_count", concept="k0") == 10


def test_queue_metrics_are_written_at_a_flush_not_per_batch() -> None:
    # the batcher only appends (size, waits) and is read for its pending count; a flush
    # (every FLUSH_S, and before every scrape) observes the batches and sets the depth
    from service.batch_metrics import QueueObserver

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    q = QueueObserver()
    pending = [5]
    q.watch(lambda: pending[0])
    before = {n: sample(n) for n in ("conceptguard_batch_size_count",
                                     "conceptguard_batch_size_sum",
                                     "conceptguard_queue_wait_seconds_count")}
    q.batch((3, [0.001, 0.002, 0.003]))
    q.batch((1, (0.0,)))
    assert sample("conceptguard_batch_size_count") == before["conceptguard_batch_size_count"]
    q.flush()
    assert sample("conceptguard_batch_size_count") == before[
        "conceptguard_batch_size_count"] + 2
    assert sample("conceptguard_batch_size_sum") == before["conceptguard_batch_size_sum"] + 4
    assert sample("conceptguard_queue_wait_seconds_count") == before[
        "conceptguard_queue_wait_seconds_count"] + 4
    assert sample("conceptguard_queue_depth") == 5
    pending[0] = 0
    q.flush()  # nothing new: only the depth moves
    assert sample("conceptguard_batch_size_count") == before[
        "conceptguard_batch_size_count"] + 2
    assert sample("conceptguard_queue_depth") == 0
