"""Every dashboard query and every Prometheus rule, run by a real Prometheus scraping the real
service (1 and 2 uvicorn workers) under mixed traffic, agrees with what the traffic was.

The client sends clean, noise and inverted Fashion-MNIST images over v1 and v2 plus some bad
requests, and counts from the answers: predictions by class and decision, reasons, the trust
scores, statuses and error codes. Prometheus scrapes every second and evaluates
``deploy/prometheus/rules/conceptguard.rules.yml`` every second. Then each of the dashboard's
queries (Grafana variables replaced) and each rule's expression is run on the Prometheus API
and compared with the client's counts within 1%. Rates are compared through one scale factor:
all series of one target share their sample times and start at 0, so Prometheus's
extrapolation multiplies every increase by the same factor, which the total number of
predictions gives. Where the client cannot know a value (latencies, concept scores, head
scores of v1/v2 answers the client does not total), the service's own ``/metrics``
exposition after the traffic is the reference. A query or rule without a check here fails
the test, so a new panel or rule needs one.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import ServerProcess, encode_png, metric_samples
from tests.test_prometheus_scrape import running_prometheus

pytestmark = pytest.mark.slow  # real servers, a real Prometheus

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "conceptguard.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "conceptguard.json"
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                "$job": ".*", "$model": ".*"}
REL = 0.01  # the goal: every panel's value within 1% of the traffic
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
REASON_LABEL = {"accepted": "accepted", "misclassification-like": "misclassification_like",
                "adversarial-like": "adversarial_like", "unfamiliar": "unfamiliar"}
QUEUE_SIZE = 64


# ---------------------------------------------------------------- what the client saw


class Traffic:
    """The client's own record of what it sent and what came back."""

    def __init__(self) -> None:
        self.cls: list[int] = []
        self.trust: list[float] = []
        self.reject: list[bool] = []
        self.reason: list[str] = []
        self.receipt: list[str] = []
        self.truth: list[int] = []  # the label sent back (0 for noise)
        self.endpoint_status: Counter[tuple[str, int]] = Counter()
        self.codes: Counter[str] = Counter()
        # labels counted: (decision, reason) -> [received, correct]
        self.feedback: dict[tuple[str, str], list[int]] = {}

    def add(self, cls: int, trust: float, reject: bool, reason: str, receipt: str,
            truth: int) -> None:
        self.cls.append(cls)
        self.trust.append(trust)
        self.reject.append(reject)
        self.reason.append(REASON_LABEL[reason])
        self.receipt.append(receipt)
        self.truth.append(truth)

    @property
    def n(self) -> int:
        return len(self.cls)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.asarray(self.cls), np.asarray(self.trust, dtype=np.float64),
                np.asarray(self.reject, dtype=bool))


def send_traffic(url: str, model: str, images: np.ndarray, labels: np.ndarray) -> Traffic:
    """Sequential requests (one batch each, in order): v1 multipart batches, v2 JSON
    batches, bad requests, then labels sent back for every other input (some twice)."""
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    inverted = 255 - images[60:70]
    t = Traffic()
    zeros = np.zeros(10, dtype=int)
    v1_batches = [(images[i:i + 10], labels[i:i + 10]) for i in range(0, 40, 10)] + [
        (noise[:10], zeros), (noise[10:20], zeros), (inverted, labels[60:70])]
    v2_batches = [(images[40:50], labels[40:50]), (images[50:60], labels[50:60]),
                  (noise[20:30], zeros)]
    v2_path = f"/v2/models/{model}/infer"
    with httpx.Client(base_url=url, timeout=60.0) as c:
        for batch, truth in v1_batches:
            r = c.post("/v1/classify", files=[("files", (f"{i}.png", encode_png(im), "image/png"))
                                              for i, im in enumerate(batch)])
            assert r.status_code == 200, r.text
            t.endpoint_status["/v1/classify", 200] += 1
            for res, y in zip(r.json()["results"], truth.tolist(), strict=True):
                t.add(res["class_index"], res["trust"], res["reject"], res["reason"]["kind"],
                      res["receipt"], y)
        for batch, truth in v2_batches:
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(batch)],
                                "data": [base64.b64encode(encode_png(im)).decode()
                                         for im in batch]}]}
            r = c.post(v2_path, json=body)
            assert r.status_code == 200, r.text
            t.endpoint_status["/v2/models/{name}/infer", 200] += 1
            out = {o["name"]: o["data"] for o in r.json()["outputs"]}
            tokens = r.json()["parameters"]["receipts"].split(",")
            rej = np.asarray(out["reject"], dtype=bool)
            why = list(out["reason_kind"])  # v2 answers carry the reason kind (issue 18)
            for k in range(len(batch)):
                t.add(int(out["class_index"][k]), float(out["trust"][k]), bool(rej[k]), why[k],
                      tokens[k], int(truth[k]))
        bad = ([("/v1/classify", {"files": {"file": ("x.png", b"not an image", "image/png")}})]
               * 3 + [("/v1/classify", {"content": b"plain text",
                                        "headers": {"content-type": "text/plain"}})] * 2)
        for path, kw in bad:
            r = c.post(path, **kw)
            assert 400 <= r.status_code < 500, r.text
            t.endpoint_status[path, r.status_code] += 1
            t.codes[r.json()["error"]["code"]] += 1
        for k in range(0, t.n, 2):
            for _ in range(2 if k % 10 == 0 else 1):  # a repeat counts once
                r = c.post("/v1/feedback", json={"receipt": t.receipt[k], "label": t.truth[k]})
                assert r.status_code == 200, r.text
                t.endpoint_status["/v1/feedback", 200] += 1
            key = ("reject" if t.reject[k] else "accept", t.reason[k])
            got = t.feedback.setdefault(key, [0, 0])
            got[0] += 1
            got[1] += int(t.truth[k] == t.cls[k])
    return t


# ---------------------------------------------------------------- Prometheus helpers


def instant(prom: str, expr: str, at: float | None = None
            ) -> list[tuple[dict[str, str], float]]:
    """An instant query (at the Unix time ``at``, default now)."""
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    resp = httpx.get(f"{prom}/api/v1/query", params=params, timeout=10.0)
    assert resp.status_code == 200, (expr, resp.text)
    body = resp.json()
    assert body["status"] == "success", body
    return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]


def by(result: list[tuple[dict[str, str], float]], label: str) -> dict[str, float]:
    out = {lab.get(label, ""): v for lab, v in result}
    assert len(out) == len(result), f"several series per {label}: {result}"
    return out


def one(result: list[tuple[dict[str, str], float]]) -> float:
    assert len(result) == 1, result
    return result[0][1]


def close(got: float, want: float, what: str, floor: float = 0.0) -> None:
    """Within 1% of the wanted value (an absolute floor for values near 0)."""
    assert math.isfinite(got), f"{what}: {got}"
    assert abs(got - want) <= max(REL * abs(want), floor), f"{what}: got {got}, want {want}"


def close_all(got: dict[str, float], want: dict[str, float], what: str,
              floor: float = 0.0) -> None:
    assert set(got) == set(want), f"{what}: series {sorted(got)} vs {sorted(want)}"
    for k in want:
        close(got[k], want[k], f"{what} [{k}]", floor)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over cumulative ``(le, count)`` pairs."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    i = next(k for k, (_, c) in enumerate(buckets) if c >= rank)
    if math.isinf(buckets[i][0]):
        return buckets[i - 1][0]
    lower, below = (0.0, 0.0) if i == 0 else buckets[i - 1]
    upper, count = buckets[i]
    if count == below:
        return upper
    return lower + (upper - lower) * (rank - below) / (count - below)


def buckets_of(text: str, name: str, **labels: str) -> list[tuple[float, float]]:
    """Cumulative buckets of one histogram in an exposition text, summed over the series
    that have ``labels`` (and over workers)."""
    acc: Counter[float] = Counter()
    for lab, v in metric_samples(text, f"{name}_bucket"):
        if all(lab.get(k) == w for k, w in labels.items()):
            acc[float(lab["le"])] += v
    return sorted(acc.items())


def client_buckets(values: np.ndarray) -> list[tuple[float, float]]:
    return [(le, float(np.count_nonzero(values <= le))) for le in SCORE_BUCKETS] + [
        (math.inf, float(len(values)))]


# ---------------------------------------------------------------- the test


def start(server_factory: Callable[..., ServerProcess], tmp_path: Path,
          workers: int) -> ServerProcess:
    settings = {"queue_size": QUEUE_SIZE, "max_wait_ms": 1}
    if workers == 1:
        return server_factory(settings=settings)
    mp = tmp_path / "multiproc"
    mp.mkdir()
    return server_factory(settings=settings, workers=workers, use_cli=True,
                          extra_env={"PROMETHEUS_MULTIPROC_DIR": str(mp)})


def wait_for(prom: str, expr: str, want: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    got: Any = None
    while time.monotonic() < deadline:
        res = instant(prom, expr)
        got = res[0][1] if res else None
        if got == want:
            return
        time.sleep(0.3)
    pytest.fail(f"{expr}: Prometheus has {got}, want {want}")


@pytest.mark.parametrize("workers", [1, 2])
def test_every_panel_and_rule_matches_the_traffic(
        workers: int, server_factory: Callable[..., ServerProcess], tmp_path: Path,
        fashion_mnist_test: Any, demo_manifest: dict[str, Any]) -> None:
    srv = start(server_factory, tmp_path, workers)
    model = demo_manifest["name"]
    classes = demo_manifest["classes"]
    n_concepts = len(demo_manifest["concepts"])
    expected_reject = 1.0 - demo_manifest["evaluation"]["threshold"]["coverage"]
    threshold = demo_manifest["threshold"]["value"]  # the bank's own: no operating point
    # rules every 1.5 s against scrapes every 1 s: consecutive recordings fall at different
    # distances after a scrape (recorded_matches_expression picks one far from it)
    with running_prometheus(srv.port, tmp_path, (RULES,), evaluation_interval="1500ms") as prom:
        # the series exist at 0 before any traffic, and Prometheus has stored that
        wait_for(prom, "count(conceptguard_predictions_total)", 2.0 * len(classes))
        wait_for(prom, "sum(conceptguard_predictions_total)", 0.0)
        time.sleep(1.5)
        images = np.asarray(fashion_mnist_test.images[:70])
        traffic = send_traffic(srv.url, model, images,
                               np.asarray(fashion_mnist_test.labels[:70]))
        n = traffic.n
        wait_for(prom, "sum(conceptguard_predictions_total)", float(n))
        wait_for(prom, "sum(conceptguard_feedback_total)", float(len(range(0, n, 2))))
        # the concept series are flushed by every worker at most a second later
        wait_for(prom, "min(sum by (concept) (conceptguard_concept_score_count))", float(n))
        time.sleep(3.0)  # every rule evaluated on the final samples
        with httpx.Client(base_url=srv.url, timeout=30.0) as c:
            text = c.get("/metrics").text
        check_everything(prom, text, traffic, classes, n_concepts, expected_reject, workers,
                         threshold)


def check_everything(prom: str, text: str, t: Traffic, classes: list[str], n_concepts: int,
                     expected_reject: float, workers: int, threshold: float) -> None:
    cls, trust, reject = t.arrays()
    n = t.n
    # every query at one instant: rate()'s extrapolation changes as time passes. A second
    # and a half back, so that every scrape up to it is stored: a scrape stored between two
    # queries would change the extrapolation under the later one
    at = time.time() - 1.5
    # the common extrapolation factor of rate() over this target's series at that instant
    scale = one(instant(prom, "sum(rate(conceptguard_predictions_total[5m]))", at)) / n
    assert scale > 0

    per_class_n = {classes[c]: float(np.sum(cls == c)) for c in range(len(classes))}
    reject_by_class = {k: float(np.sum(reject & (cls == c))) / per_class_n[k]
                       for c, k in enumerate(classes) if per_class_n[k]}
    trust_by_class = {k: float(trust[cls == c].mean()) for c, k in enumerate(classes)
                      if per_class_n[k]}
    reason_n = Counter(t.reason)
    fb_decision: dict[str, list[int]] = {"accept": [0, 0], "reject": [0, 0]}
    for (decision, _), (got_n, right) in t.feedback.items():
        fb_decision[decision][0] += got_n
        fb_decision[decision][1] += right
    received_by_decision = {k: float(v[0]) for k, v in fb_decision.items()}
    realised_by_decision = {k: v[1] / v[0] if v[0] else math.nan
                            for k, v in fb_decision.items()}
    realised_by_reason = {f"{d} {r}": (t.feedback[d, r][1] / t.feedback[d, r][0]
                                       if (d, r) in t.feedback else math.nan)
                          for d, r in (("accept", "accepted"),
                                       *(("reject", x) for x in REASON_LABEL.values()
                                         if x != "accepted"))}
    reject_rate = float(reject.mean())
    est_all, est_acc = float(trust.mean()), float(trust[~reject].mean())
    trust_b = client_buckets(trust)

    # the service's own exposition: references for what the client cannot total
    def expo(name: str, **labels: str) -> float:
        return sum(v for lab, v in metric_samples(text, name)
                   if all(lab.get(k) == w for k, w in labels.items()))

    concept_names = sorted({lab["concept"] for lab, _ in
                            metric_samples(text, "conceptguard_concept_score_count")})
    assert len(concept_names) == n_concepts
    concept_mean = {k: expo("conceptguard_concept_score_sum", concept=k)
                    / expo("conceptguard_concept_score_count", concept=k) for k in concept_names}
    concept_ema = {lab["concept"]: v for lab, v in
                   metric_samples(text, "conceptguard_concept_score_mean")}
    paper = expo("conceptguard_paper_rule_rejections_total")
    heads = ("misclassification", "anomaly", "adversarial", "unfamiliar")
    head_b = {h: buckets_of(text, "conceptguard_head_score", head=h) for h in heads}
    endpoints = {e for e, _ in t.endpoint_status}  # classify, infer, feedback
    lat_b = {e: buckets_of(text, "conceptguard_request_duration_seconds", endpoint=e)
             for e in endpoints}
    lat_all: Counter[float] = Counter()
    for e in endpoints:
        for le, c in lat_b[e]:
            lat_all[le] += c
    lat_all_b = sorted(lat_all.items())
    wait_b = buckets_of(text, "conceptguard_queue_wait_seconds")
    infer_b = buckets_of(text, "conceptguard_inference_duration_seconds")
    batch_mean = expo("conceptguard_batch_size_sum") / expo("conceptguard_batch_size_count")
    assert expo("conceptguard_trust_score_count") == n

    def q(expr: str) -> list[tuple[dict[str, str], float]]:
        return instant(prom, expr, at)

    def rate_counts(res: list[tuple[dict[str, str], float]], label: str) -> dict[str, float]:
        """Rates turned back into counts."""
        return {k: v / scale for k, v in by(res, label).items()}

    # ---- every dashboard query ---------------------------------------------------------
    def dash(title: str, ref: str, res: list[tuple[dict[str, str], float]]) -> None:
        key = (title, ref)
        if key == ("Rejection rate: overall and by reason", "A"):
            close(one(res), reject_rate, "reject rate")
        elif key == ("Rejection rate: overall and by reason", "B"):
            want = {r: reason_n[r] / n for r in REASON_LABEL.values() if r != "accepted"}
            close_all(by(res, "reason"), want, "reject rate by reason")
        elif key == ("Rejection rate: overall and by reason", "C"):
            close(one(res), paper / n, "paper rule rate")
        elif key == ("Rejection rate: overall and by reason", "D"):
            close(one(res), expected_reject, "bank's clean reject rate")
        elif key == ("Rejection rate (5m)", "A"):
            close(one(res), reject_rate, "reject rate stat")
        elif key == ("Targets up", "A"):
            assert one(res) == 1.0
        elif key == ("Rejection rate per class", "A"):
            close_all(by(res, "class"), reject_by_class, "reject rate per class", floor=1e-9)
        elif key == ("Predictions per second by decision", "A"):
            close_all(rate_counts(res, "decision"),
                      {"accept": float(np.sum(~reject)), "reject": float(np.sum(reject))},
                      "predictions by decision")
        elif key == ("Predicted-class mix", "A"):
            close_all(by(res, "class"), {k: v / n for k, v in per_class_n.items()},
                      "class mix", floor=1e-9)
        elif key == ("Estimated vs. realised accuracy", "A"):
            close(one(res), est_all, "estimated accuracy")
        elif key == ("Estimated vs. realised accuracy", "B"):
            close(one(res), est_acc, "estimated accuracy of accepted inputs")
        elif key == ("Estimated vs. realised accuracy", "C"):
            got = by(res, "inputs")
            assert set(got) == {"all", "accepted"}
            for inputs, values in (("all", trust), ("accepted", trust[~reject])):
                # a moving average lies within the values it averages
                assert values.min() <= got[inputs] <= values.max(), (inputs, got)
                if workers == 1:  # one worker, in order: the exact moving average
                    close(got[inputs], ema(values), f"trust moving average ({inputs})")
        elif key == ("Estimated vs. realised accuracy", "D"):
            check_realised(by(res, "decision"), realised_by_decision, "realised accuracy")
        elif key == ("Estimated accuracy per predicted class", "A"):
            got = {k: v for k, v in by(res, "class").items() if not math.isnan(v)}
            close_all(got, trust_by_class, "estimated accuracy per class")
        elif key == ("Realised accuracy by decision and reason", "A"):
            check_realised({f"{lab['decision']} {lab['reason']}": v for lab, v in res},
                           realised_by_reason, "realised accuracy by reason")
        elif key == ("Labels received per second", "A"):
            close_all(rate_counts(res, "decision"), received_by_decision, "labels received")
        elif key == ("Trust score distribution", "A"):
            got = by(res, "le")
            total = got["+Inf"]
            close_all({float(k): v / total for k, v in got.items()},
                      {le: c / n for le, c in trust_b}, "trust histogram", floor=1e-9)
            close(total / (scale * 300), n, "trust histogram count")  # increase over 5m
        elif key == ("Trust score median and p10", "A"):
            close(one(res), histogram_quantile(0.5, trust_b), "trust p50")
        elif key == ("Trust score median and p10", "B"):
            close(one(res), histogram_quantile(0.1, trust_b), "trust p10")
        elif title == "Head score quantiles":
            qv = {"A": 0.5, "B": 0.9, "C": 0.99}[ref]
            close_all(by(res, "head"), {h: histogram_quantile(qv, head_b[h]) for h in heads},
                      f"head score p{qv}")
        elif key == ("Request rate by status", "A"):
            got = rate_counts(res, "status")
            for status in {s for (_, s) in t.endpoint_status if s != 200}:
                close(got[str(status)], sum(v for (_, s), v in t.endpoint_status.items()
                                            if s == status), f"requests with status {status}")
            # 200 also counts the scrapes of /metrics and nothing else answers 200 here
            assert got["200"] >= t.endpoint_status["/v1/classify", 200]
        elif key == ("Request rate by endpoint", "A"):
            got = rate_counts(res, "endpoint")
            for e in endpoints:
                close(got[e], sum(v for (p, _), v in t.endpoint_status.items() if p == e),
                      f"requests to {e}")
        elif title == "Request latency p50 / p95 / p99":
            qv = {"A": 0.5, "B": 0.95, "C": 0.99}[ref]
            close(one(res), histogram_quantile(qv, lat_all_b), f"latency p{qv}")
        elif title == "Latency p50 / p99 per endpoint":
            qv = {"A": 0.5, "B": 0.99}[ref]
            got = {k: v for k, v in by(res, "endpoint").items() if not math.isnan(v)}
            close_all(got, {e: histogram_quantile(qv, lat_b[e]) for e in endpoints},
                      f"latency p{qv} per endpoint")
        elif title == "Queue wait p50 / p95 / p99":
            qv = {"A": 0.5, "B": 0.95, "C": 0.99}[ref]
            close(one(res), histogram_quantile(qv, wait_b), f"queue wait p{qv}")
        elif title == "Inference p50 / p95 / p99":
            qv = {"A": 0.5, "B": 0.95, "C": 0.99}[ref]
            close(one(res), histogram_quantile(qv, infer_b), f"inference p{qv}")
        elif key == ("Batch size distribution", "A"):
            got = by(res, "le")
            want = dict(buckets_of(text, "conceptguard_batch_size"))
            close_all({float(k): v / (scale * 300) for k, v in got.items()}, want,
                      "batch sizes")
        elif key == ("Mean batch size", "A"):
            close(one(res), batch_mean, "mean batch size")
        elif key in {("Queue depth", "A"), ("Queue saturation", "A")}:
            assert one(res) == 0.0
        elif key == ("Concept score running mean, per concept", "A"):
            close_all(by(res, "concept"), concept_mean, "concept means", floor=1e-9)
        elif key == ("Concept drift: running mean minus 24h mean", "A"):
            # both windows hold all the traffic: no drift between them
            scale_c = max(abs(v) for v in concept_mean.values())
            close_all(by(res, "concept"), dict.fromkeys(concept_mean, 0.0),
                      "running minus 24h mean", floor=REL * scale_c)
        elif key == ("Concept score EMA (service gauge)", "A"):
            close_all(by(res, "concept"), concept_ema, "concept EMA", floor=1e-9)
        elif key == ("Bad requests by code", "A"):
            got = {k: v for k, v in rate_counts(res, "code").items() if v}
            close_all(got, {k: float(v) for k, v in t.codes.items()}, "bad requests by code")
        elif key == ("Queue-full refusals", "A"):
            assert one(res) == 0.0
        elif key == ("Bank reloads by result", "A"):
            close_all(by(res, "result"), {"success": 0.0, "failure": 0.0}, "bank reloads")
        elif key == ("Inference-logger sink events", "A"):
            assert res and all(v == 0.0 for _, v in res), res  # no event was sent
        elif key == ("Inference-logger sink pairs", "A"):
            assert res and all(v == 0.0 for _, v in res), res
        elif key == ("Reject threshold in use", "A"):
            close_all(by(res, "target"), {"bank": threshold}, "reject threshold")
        elif key == ("Bank info", "A"):
            assert {lab["bank_id"] for lab, _ in res} == {expo_bank_id(text)}
        else:
            pytest.fail(f"no check for the panel query {key}: add one")

    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    checked = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, expr
            dash(panel["title"], target["refId"], q(expr))
            checked += 1
    assert checked >= 45

    # ---- every rule -------------------------------------------------------------------
    rules = [r for g in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
             for r in g["rules"]]
    latency_p99 = {e: histogram_quantile(0.99, lat_b[e]) for e in endpoints}
    adv, unf = reason_n["adversarial_like"], reason_n["unfamiliar"]
    fires = {  # each alert's condition, evaluated on the known traffic
        "ConceptGuardRejectionRateSpike": reject_rate > 0.2 and reject_rate > 2 * expected_reject,
        "ConceptGuardRejectionRateHigh": reject_rate > 0.5,
        "ConceptGuardAdversarialLikeRejections": adv / n > 0.05 and adv * scale * 300 >= 10,
        "ConceptGuardUnfamiliarInputs": unf / n > 0.2 and unf * scale * 300 >= 20,
        "ConceptGuardConceptDrift": any(abs(v) > 1 for v in concept_mean.values()),
        "ConceptGuardEstimatedAccuracyFalling": False,  # 5m and 6h hold the same traffic
        "ConceptGuardServerErrors": False,
        "ConceptGuardNoTraffic": False,
        "ConceptGuardHighLatencyP99": any(v > 0.5 for v in latency_p99.values()),
        "ConceptGuardQueueFull": False,
        "ConceptGuardBankReloadFailed": False,
        "ConceptGuardDown": False,
        "ConceptGuardAbsent": False,
    }
    assert n * scale > 0.1  # the traffic floors of the alerts are met
    records = {
        "conceptguard:predictions:rate5m": lambda r: close(one(r) / scale, n, "predictions"),
        "conceptguard:rejections:rate5m": lambda r: close(one(r) / scale, reject.sum(),
                                                          "rejections"),
        "conceptguard:rejection_rate:5m": lambda r: close(one(r), reject_rate, "reject rate"),
        "conceptguard:rejection_rate:1h": lambda r: close(one(r), reject_rate, "reject rate"),
        "conceptguard:rejection_rate_by_reason:5m": lambda r: close_all(
            by(r, "reason"), {k: reason_n[k] / n for k in REASON_LABEL.values()
                              if k != "accepted"}, "by reason"),
        "conceptguard:rejection_rate_by_class:5m": lambda r: close_all(
            by(r, "class"), reject_by_class, "by class", floor=1e-9),
        "conceptguard:paper_rule_rejections:rate5m": lambda r: close(one(r) / scale, paper,
                                                                     "paper rule"),
        "conceptguard:trust_score:p50_5m": lambda r: close(
            one(r), histogram_quantile(0.5, trust_b), "trust p50"),
        "conceptguard:trust_score:p10_5m": lambda r: close(
            one(r), histogram_quantile(0.1, trust_b), "trust p10"),
        "conceptguard:head_score:p50_5m": lambda r: close_all(
            by(r, "head"), {h: histogram_quantile(0.5, head_b[h]) for h in heads}, "head p50"),
        "conceptguard:head_score:p90_5m": lambda r: close_all(
            by(r, "head"), {h: histogram_quantile(0.9, head_b[h]) for h in heads}, "head p90"),
        "conceptguard:concept_score:mean_5m": lambda r: close_all(
            by(r, "concept"), concept_mean, "concept mean 5m", floor=1e-9),
        "conceptguard:concept_score:mean_1h": lambda r: close_all(
            by(r, "concept"), concept_mean, "concept mean 1h", floor=1e-9),
        "conceptguard:estimated_accuracy:5m": lambda r: close(one(r), est_all, "est 5m"),
        "conceptguard:estimated_accuracy:6h": lambda r: close(one(r), est_all, "est 6h"),
        "conceptguard:estimated_accuracy_accepted:5m": lambda r: close(one(r), est_acc,
                                                                       "est accepted"),
        "conceptguard:estimated_accuracy_by_class:5m": lambda r: close_all(
            {k: v for k, v in by(r, "class").items() if not math.isnan(v)}, trust_by_class,
            "est by class"),
        "conceptguard:realised_accuracy:1h": lambda r: check_realised(
            by(r, "decision"), realised_by_decision, "realised accuracy"),
        "conceptguard:realised_accuracy_by_reason:1h": lambda r: check_realised(
            {f"{lab['decision']} {lab['reason']}": v for lab, v in r}, realised_by_reason,
            "realised accuracy by reason"),
        "conceptguard:requests:rate5m": lambda r: check_requests(r, t, scale, endpoints),
        "conceptguard:request_duration_seconds:p50_5m": lambda r: latency(r, lat_b, 0.5),
        "conceptguard:request_duration_seconds:p95_5m": lambda r: latency(r, lat_b, 0.95),
        "conceptguard:request_duration_seconds:p99_5m": lambda r: latency(r, lat_b, 0.99),
        "conceptguard:queue_wait_seconds:p99_5m": lambda r: close(
            one(r), histogram_quantile(0.99, wait_b), "queue wait p99"),
        "conceptguard:inference_duration_seconds:p99_5m": lambda r: close(
            one(r), histogram_quantile(0.99, infer_b), "inference p99"),
        "conceptguard:batch_size:mean_5m": lambda r: close(one(r), batch_mean, "batch mean"),
        "conceptguard:queue_full:rate5m": lambda r: close(one(r), 0.0, "queue full"),
        "conceptguard:bad_requests:rate5m": lambda r: close_all(
            {k: v for k, v in rate_counts(r, "code").items() if v},
            {k: float(v) for k, v in t.codes.items()}, "bad requests"),
        "conceptguard:server_errors:ratio_5m": lambda r: close(one(r), 0.0, "server errors"),
        "conceptguard:queue_saturation": lambda r: close(one(r), 0.0, "saturation"),
        "conceptguard:rejection_rate:baseline": lambda r: close(one(r), expected_reject,
                                                                "baseline"),
    }
    met = sorted(k for k, v in fires.items() if v)
    print(f"{workers} worker(s): {n} predictions, reject rate {reject_rate:.3f}, estimated "
          f"accuracy {est_all:.3f} (accepted {est_acc:.3f}), realised accuracy of the labels "
          f"sent back {realised_by_decision}, alert conditions met: {met}")
    for rule in rules:
        if "record" in rule:
            name = rule["record"]
            assert name in records, f"no check for the recording rule {name}: add one"
            records[name](q(rule["expr"]))  # the expression on the raw series
            recorded_matches_expression(prom, name, rule["expr"], at)
        else:
            name = rule["alert"]
            assert name in fires, f"no check for the alert {name}: add one"
            got = q(rule["expr"])
            assert bool(got) == fires[name], (name, got, fires[name])
    # the capacity the saturation divides by: the queue of every worker
    close(one(q("sum(conceptguard_queue_capacity)")), QUEUE_SIZE * workers, "queue capacity")


def ema(values: np.ndarray, alpha: float = 0.01) -> float:
    m = float(values[0])
    for v in values.tolist():
        m = (1 - alpha) * m + alpha * v
    return m


def recorded_matches_expression(prom: str, name: str, expr: str, at: float) -> None:
    """What Prometheus recorded for a rule equals the rule's expression evaluated at the
    time of that recording.

    Prometheus 2.42 (Debian's) evaluates a rule on the samples stored when it runs: a scrape
    stamped just before the evaluation but still being ingested is missing from the rule's
    view and present in a later query at the same time (rate5m then differs by a third).
    Rules run every 1.5 s and scrapes every 1 s, so of the last recordings one lies at least
    a quarter of a second after its scrape; that one is compared."""
    recorded = ranged(prom, f"{name}[6s]", at)
    assert recorded, f"{name} was not recorded"
    scrapes = sorted(t for _, pts in ranged(prom, 'up{job="conceptguard"}[8s]', at)
                     for t, _ in pts)
    for lab, points in recorded:
        key = json.dumps({k: v for k, v in lab.items() if k != "__name__"}, sort_keys=True)

        def after_scrape(t: float) -> float:
            return t - max((s for s in scrapes if s <= t), default=t - 1.0)

        when, value = max(points, key=lambda p: after_scrape(p[0]))
        assert after_scrape(when) >= 0.2, (name, points, scrapes)
        want = _at(prom, expr, when)[key]
        if math.isnan(want):
            assert math.isnan(value), (name, lab, value)
        else:
            close(value, want, f"{name} recorded {lab} at {when}", floor=1e-12)


Series = list[tuple[dict[str, str], list[tuple[float, float]]]]


def ranged(prom: str, expr: str, at: float) -> Series:
    """A range-vector query (``metric[window]``) at ``at``: each series' raw samples."""
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr, "time": f"{at:.3f}"},
                     timeout=10.0)
    assert resp.status_code == 200, (expr, resp.text)
    body = resp.json()
    assert body["status"] == "success" and body["data"]["resultType"] == "matrix", body
    return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]])
            for r in body["data"]["result"]]


_CACHE: dict[tuple[str, str, float], dict[str, float]] = {}


def _at(prom: str, expr: str, at: float) -> dict[str, float]:
    key = (prom, expr, at)
    if key not in _CACHE:
        _CACHE[key] = {json.dumps(lb, sort_keys=True): v for lb, v in instant(prom, expr, at)}
    return _CACHE[key]


def check_realised(got: dict[str, float], want: dict[str, float], what: str) -> None:
    """Realised accuracies: equal where labels came back, NaN (0 / 0) where none did."""
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    for k, w in want.items():
        if math.isnan(w):
            assert math.isnan(got[k]), (what, k, got[k])
        else:
            close(got[k], w, f"{what} [{k}]")


def check_requests(res: list[tuple[dict[str, str], float]], t: Traffic, scale: float,
                   endpoints: set[str]) -> None:
    got = {(lab["endpoint"], int(lab["status"])): v / scale for lab, v in res}
    for (e, status), count in t.endpoint_status.items():
        close(got[e, status], count, f"requests {e} {status}")
    for (e, status), v in got.items():  # nothing else on these endpoints
        if e in endpoints and (e, status) not in t.endpoint_status:
            assert v == 0.0, (e, status, v)


def latency(res: list[tuple[dict[str, str], float]], lat_b: dict[str, list[tuple[float, float]]],
            qv: float) -> None:
    got = {lab["endpoint"]: v for lab, v in res}
    for e, b in lat_b.items():
        close(got[e], histogram_quantile(qv, b), f"latency p{qv} {e}")


def expo_bank_id(text: str) -> str:
    ids = {lab["bank_id"] for lab, v in metric_samples(text, "conceptguard_bank_info") if v == 1}
    assert len(ids) == 1, ids
    return ids.pop()
