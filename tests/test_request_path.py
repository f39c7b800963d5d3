"""The service's request path in parts: per-batch Prometheus observations equal one
observation per value (single- and multi-process), Scores row selection and concatenation,
the one error base and its rendering, and where images are decoded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, Summary, generate_latest

from conceptguard.scoring import Scores
from service.batch_metrics import observe_many, observe_summary_many
from service.codecs import Decoder, where
from service.errors import (
    BatcherClosed,
    BodyTimeout,
    NotReady,
    QueueFull,
    ServiceError,
    as_service_error,
    error_response,
)
from service.metrics import SCORE_BUCKETS
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
# bounds exactly, between them, below and above every bound, negative, repeated
VALUES = np.array([0.05, 0.049999, 0.050001, 0.0, -0.2, 1.0, 1.2, 0.35, 0.35, 0.999, 7.0,
                   *np.linspace(0, 1, 57)])


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    out = {}
    for metric in registry.collect():
        for s in metric.samples:
            key = s.name + json.dumps(s.labels, sort_keys=True)
            out[key] = s.value
    return out


def _same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("{}") and "_sum" in key:  # the sum: one addition, not one per value
            assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-12)
        else:
            assert b[key] == a[key], key


def test_observe_many_equals_one_observe_per_value() -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("t_score", "x", buckets=SCORE_BUCKETS, registry=one)
    h2 = Histogram("t_score", "x", buckets=SCORE_BUCKETS, registry=many)
    s1 = Summary("t_concept", "x", registry=one)
    s2 = Summary("t_concept", "x", registry=many)
    for v in VALUES:
        h1.observe(float(v))
        s1.observe(float(v))
    observe_many(h2, VALUES[:10])
    observe_many(h2, VALUES[10:])  # two batches add up
    observe_many(h2, np.array([]))
    observe_summary_many(s2, len(VALUES), float(VALUES.sum()))
    _same(_samples(one), _samples(many))


def test_batches_of_one_observe_as_observe_does() -> None:
    """A batch of one takes a shorter path (one value per histogram): the same buckets and
    sums as ``observe``, at bounds, between them, for +Inf and NaN (no bucket), with several
    histograms at once."""
    from service.batch_metrics import observe_rows

    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("t_one", "x", ["head"], buckets=SCORE_BUCKETS, registry=one)
    h2 = Histogram("t_one", "x", ["head"], buckets=SCORE_BUCKETS, registry=many)
    values = [*VALUES.tolist(), np.inf, -np.inf, np.nan]
    for a, b in zip(values, reversed(values), strict=True):
        h1.labels("a").observe(a)
        h1.labels("b").observe(b)
        observe_rows([h2.labels("a"), h2.labels("b")], np.array([[a], [b]]))
    got, want = _samples(many), _samples(one)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key] or (np.isnan(got[key]) and np.isnan(want[key])), key


def test_labelled_children_and_the_exposition_text() -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("t_head", "x", ["model", "head"], buckets=SCORE_BUCKETS, registry=one)
    h2 = Histogram("t_head", "x", ["model", "head"], buckets=SCORE_BUCKETS, registry=many)
    values = np.round(VALUES, 3)  # sums equal to the last digit printed
    for v in values:
        h1.labels("demo", "adversarial").observe(float(v))
    observe_many(h2.labels("demo", "adversarial"), values)
    assert (generate_latest(one).decode().splitlines()[:-2]
            == generate_latest(many).decode().splitlines()[:-2])  # all but the sum lines


_MULTIPROCESS = """
import json, sys
import numpy as np
from prometheus_client import CollectorRegistry, Histogram, Summary, multiprocess
from service.batch_metrics import observe_many, observe_summary_many
from service.metrics import SCORE_BUCKETS
values = np.array(json.loads(sys.argv[1]))
h1 = Histogram("mp_one", "x", ["model"], buckets=SCORE_BUCKETS)
h2 = Histogram("mp_many", "x", ["model"], buckets=SCORE_BUCKETS)
s1 = Summary("mp_s_one", "x", ["model"])
s2 = Summary("mp_s_many", "x", ["model"])
for v in values:
    h1.labels("m").observe(float(v)); s1.labels("m").observe(float(v))
observe_many(h2.labels("m"), values)
observe_summary_many(s2.labels("m"), len(values), float(values.sum()))
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
out = {}
for metric in registry.collect():
    for s in metric.samples:
        out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
print(json.dumps(out))
"""


def test_observe_many_in_multiprocess_mode(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _MULTIPROCESS, json.dumps(VALUES.tolist())],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    samples = json.loads(out.stdout)
    one = {k.replace("mp_s_one", "S").replace("mp_one", "H"): v for k, v in samples.items()
           if k.startswith(("mp_one", "mp_s_one"))}
    many = {k.replace("mp_s_many", "S").replace("mp_many", "H"): v
            for k, v in samples.items() if k.startswith(("mp_many", "mp_s_many"))}
    assert len(one) == len(SCORE_BUCKETS) + 1 + 2 + 2  # buckets incl. +Inf, count, sum, S
    for key in one:
        if "_sum" in key:
            assert many[key] == pytest.approx(one[key], rel=1e-12)
        else:
            assert many[key] == one[key], key


def _scores(n: int, offset: float = 0.0) -> Scores:
    rng = np.random.default_rng(int(offset * 10))
    trust = rng.random(n) + offset
    return Scores(probabilities=rng.random((n, 3)), predictions=np.arange(n) % 3,
                  risks={"msp": rng.random(n), "knn": rng.random(n)},
                  p_misclassification=rng.random(n), p_anomaly=rng.random(n),
                  p_adversarial=rng.random(n), p_unfamiliar=rng.random(n), trust=trust,
                  reject=trust < 0.5, reason=[f"r{i}" for i in range(n)],
                  paper_rule_reject=trust < 0.3, contributions=rng.random((n, 4)))


def _equal(a: Scores, b: Scores) -> bool:
    return (a.reason == b.reason and a.risks.keys() == b.risks.keys()
            and all(np.array_equal(a.risks[k], b.risks[k]) for k in a.risks)
            and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in
                    ("probabilities", "predictions", "p_misclassification", "p_anomaly",
                     "p_adversarial", "p_unfamiliar", "trust", "reject",
                     "paper_rule_reject", "contributions")))


def test_scores_rows_and_concat_round_trip() -> None:
    s = _scores(6)
    parts = [s.rows(slice(i, i + 1)) for i in range(6)]
    assert all(len(p) == 1 for p in parts)
    assert parts[2].reason == ["r2"] and parts[2].trust[0] == s.trust[2]
    assert np.shares_memory(parts[2].trust, s.trust)  # a slice is a view
    assert _equal(Scores.concat(parts), s)
    picked = s.rows([4, 1])
    assert picked.reason == ["r4", "r1"]
    assert np.array_equal(picked.contributions, s.contributions[[4, 1]])
    other = _scores(2, 1.0)
    both = Scores.concat([s, other])
    assert len(both) == 8 and _equal(both.rows(slice(6, 8)), other)
    assert Scores.concat([s]) is s
    with pytest.raises(ValueError):
        Scores.concat([])
    mask = np.zeros(6, bool)
    mask[[1, 4]] = True  # a boolean mask picks those rows, not rows 0 and 1
    assert _equal(s.rows(mask), s.rows([1, 4]))
    with pytest.raises(ValueError, match="boolean mask over 6 inputs"):
        s.rows(np.ones(5, bool))


def test_every_error_is_one_base_with_status_and_code() -> None:
    cases = [(QueueFull(3, 2, 4), 503, "queue_full"), (BatcherClosed(), 503, "shutting_down"),
             (NotReady(), 503, "not_ready"), (BodyTimeout(2.0), 408, "timeout")]
    for err, status, code in cases:
        assert isinstance(err, ServiceError)
        assert (err.status, err.code) == (status, code)
        assert as_service_error(err) is err
    assert as_service_error(RecursionError()).code == "invalid_json"
    internal = as_service_error(KeyError("x"))
    assert (internal.status, internal.code) == (500, "internal")
    assert "KeyError" in internal.message


def test_error_bodies_v1_and_v2_and_retry_after() -> None:
    err = ServiceError("no such thing", 404, "not_found")
    v1 = error_response("/v1/classify", err)
    v2 = error_response("/v2/models/demo/infer", err)
    assert json.loads(v1.body) == {"error": {"code": "not_found", "message": "no such thing"}}
    assert json.loads(v2.body) == {"error": "no such thing"}
    assert v1.status_code == v2.status_code == 404
    assert "retry-after" not in v1.headers
    busy = error_response("/v1/classify", QueueFull(1, 1, 1), retry_after_s=7)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "7"
    closing = error_response("/v2/models/demo/infer", BodyTimeout(1.0))
    assert closing.headers["connection"] == "close"


def test_decoder_names_the_image_and_routes_by_size(sample_png: bytes) -> None:
    d = Decoder(Settings(inline_decode_bytes=1000, decode_concurrency=2))
    assert d.inline(b"x" * 1000) and not d.inline(b"x" * 1001)
    arr = d.decode(sample_png, (1, 28, 28))
    assert arr.shape[:2] == (28, 28) and arr.dtype == np.uint8
    with pytest.raises(ServiceError) as info:
        d.decode(b"not an image at all", (1, 28, 28), where(1, 3))
    assert info.value.message.startswith("image 1: ")
    assert (info.value.status, info.value.code) == (400, "not_an_image")
    assert where(0, 1) == ""


def test_the_batch_worker_decodes_and_fails_only_the_bad_image(demo_bank_dir: Path,
                                                               sample_png: bytes) -> None:
    """run_batch gets encoded bytes (decoded there: one hop), decoded arrays and a bad
    image in one batch: one runtime call, the bad image gets its own error."""
    from service.dataplane import DataPlane, Job, gather
    from service.runtime_state import RuntimeState, load

    settings = Settings(bank=demo_bank_dir, backend="onnx", device="cpu", threads=1)
    loaded = load(demo_bank_dir, settings)
    plane = DataPlane(RuntimeState(settings), settings)
    try:
        decoded = plane.decoder.decode(sample_png, loaded.input_shape)
        out = plane.run_batch([Job(loaded, sample_png), Job(loaded, b"junk", "image 1: "),
                               Job(loaded, decoded)])
    finally:
        plane._executor.shutdown(wait=False)
    good_row, bad, same_row = out
    assert isinstance(bad, ServiceError) and bad.message.startswith("image 1: ")
    assert not isinstance(good_row, BaseException)
    assert not isinstance(same_row, BaseException)
    assert good_row[0] is same_row[0]  # rows of one batch's scores: one runtime call
    assert (good_row[1], same_row[1]) == (0, 1)
    both, concepts = gather([good_row, same_row])  # side by side in one batch: one slice
    assert np.shares_memory(both.trust, good_row[0].trust)
    assert np.shares_memory(concepts, good_row[2]) and len(concepts) == 2
    (good, good_c), (same, same_c) = gather([good_row]), gather([same_row])
    assert np.array_equal(good_c[0], concepts[0]) and np.array_equal(same_c[0], concepts[1])
    assert isinstance(good, Scores) and isinstance(same, Scores)
    assert len(good) == len(same) == 1 and len(both) == 2
    assert np.array_equal(good.predictions, same.predictions)
    assert good.trust == pytest.approx(same.trust, abs=1e-5)  # rows of one batch call


def test_model_metrics_record_counts_a_batch_per_input() -> None:
    """One record() of a batch gives the counts and histograms of one observation per
    input (the label sets of the exported series do not change)."""
    from prometheus_client import REGISTRY

    from service.batch_metrics import ModelMetrics

    s = _scores(9)
    s = Scores(**{**s.__dict__, "reason": ["unfamiliar", "none", "adversarial-like"] * 3})
    m = ModelMetrics("batch-test", ["a", "b", "c"], ["k0", "k1", "k2", "k3"], {})
    concepts = np.arange(36, dtype=np.float32).reshape(9, 4)
    m.record((s, concepts))
    m.record((s.rows(slice(0, 0)), concepts[:0]))  # an empty batch records nothing

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"model": "batch-test", **labels})

    # record() only queues (the deque's own append: no code of batch_metrics runs on the
    # request path); the batches are observed on flush (every FLUSH_S, and on scrape)
    assert type(m.record).__name__ == "builtin_function_or_method"
    assert value("conceptguard_trust_score_count") == 0
    m.flush()

    for c, cls in enumerate("abc"):
        for decision, flag in (("accept", False), ("reject", True)):
            want = int(np.sum((s.predictions == c) & (s.reject == flag)))
            got = value("conceptguard_predictions_total", **{"class": cls,
                                                             "decision": decision})
            assert got == want, (cls, decision)
    assert value("conceptguard_rejections_total", reason="unfamiliar") == 3
    assert value("conceptguard_rejections_total", reason="adversarial_like") == 3
    assert value("conceptguard_paper_rule_rejections_total") == s.paper_rule_reject.sum()
    assert value("conceptguard_trust_score_count") == 9
    assert value("conceptguard_trust_score_bucket", le="0.5") == np.sum(s.trust <= 0.5)
    assert value("conceptguard_head_score_bucket", head="adversarial",
                 le="0.25") == np.sum(s.p_adversarial <= 0.25)
    assert value("conceptguard_concept_score_count", concept="k1") == 9
    assert value("conceptguard_concept_score_sum", concept="k1") == pytest.approx(
        float(concepts[:, 1].sum()))


def test_the_json_guard_runs_once_per_request(demo_bank_dir: Path, sample_png: bytes,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware checks a JSON body's depth and encoding and marks the request; the
    route that parses the same body does not check it again. A body the middleware did not
    see as JSON (no Content-Type) is still checked, once, by the route."""
    import base64

    from fastapi.testclient import TestClient

    from service import codecs, middleware
    from service.app import create_app

    calls: list[int] = []

    def counted(body: bytes, max_depth: int) -> str | None:
        calls.append(len(body))
        return real(body, max_depth)

    real = codecs.json_problem
    monkeypatch.setattr(codecs, "json_problem", counted)
    monkeypatch.setattr(middleware, "json_problem", counted)
    settings = Settings(bank=demo_bank_dir, backend="onnx", device="cpu", threads=1,
                        grpc_port=0)
    body = json.dumps({"images": [base64.b64encode(sample_png).decode()] * 2}).encode()
    with TestClient(create_app(settings)) as client:
        for _ in range(300):
            if client.get("/v2/health/ready").status_code == 200:
                break
            time.sleep(0.1)
        calls.clear()
        ok = client.post("/v1/classify", content=body,
                         headers={"Content-Type": "application/json"})
        assert ok.status_code == 200, ok.text
        assert calls == [len(body)]
        calls.clear()
        bare = client.post("/v1/classify", content=body, headers={"Content-Type": ""})
        assert bare.status_code == 200, bare.text
        assert calls == [len(body)]
        calls.clear()
        deep = client.post("/v1/classify", content=b"[" * 200 + b"]" * 200,
                           headers={"Content-Type": "application/json"})
        assert deep.status_code == 400 and "nested" in deep.json()["error"]["message"]
        assert len(calls) == 1


def _request_path_script():  # -> the module scripts/request_path_files.py
    import importlib.util

    spec = importlib.util.spec_from_file_location("request_path_files",
                                                  REPO / "scripts" / "request_path_files.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_v1_classify_runs_at_most_8_files_and_no_framework_routing() -> None:
    """One POST /v1/classify (JSON, raw and multipart bodies; the demo bank, in-process):
    at most 8 modules of ours run, 5 of them in service/ (the bank's constants are
    attributes: no code of ``runtime_state.py``; the receipts are signed by the codecs:
    none of ``feedback.py``; the decision is scoring's: none of ``trust.py``), and neither
    the framework's router nor FastAPI's request handling (dependencies, validation): the
    middleware answers the hot route itself."""
    script = _request_path_script()
    for body in ("json", "raw", "multipart"):
        status, files = script.files_run(REPO / "banks" / "demo", body)
        assert status == 200
        ours = script.project_files(files)
        service = [f for f in ours if f.startswith("service" + os.sep)]
        assert len(ours) <= 8, ours
        assert len(service) <= 5, service
        for absent in ("service/runtime_state.py", "service/feedback.py",
                       "conceptguard/trust.py"):
            assert absent not in ours, ours
        assert {"service/middleware.py", "service/routes_v1.py", "service/dataplane.py",
                "service/codecs.py"} <= set(service), service  # the walk saw the request
        framework = [f for f in files if f.endswith((os.path.join("starlette", "routing.py"),
                                                     os.path.join("fastapi", "routing.py")))]
        assert framework == [], framework


def test_a_dropped_banks_queued_requests_are_still_counted() -> None:
    """The metrics of a bank replaced by a reload go with its last reference (the last
    request that held it): what its requests queued is written first, not lost."""
    from prometheus_client import REGISTRY

    from service.batch_metrics import ModelMetrics

    m = ModelMetrics("dropped-test", ["a", "b", "c"], ["k0"], {})
    s = _scores(5)
    m.record((s, np.zeros((5, 1), np.float32)))
    del m  # the last reference: no flush was called
    assert REGISTRY.get_sample_value("conceptguard_trust_score_count",
                                     {"model": "dropped-test"}) == 5


def test_the_serving_bank_is_the_current_one_once_warmed(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """``RuntimeState.serving`` (what the hot route reads) is None until the bank is
    warmed, follows every swap after that, and is None again after stop; ``require`` says
    503 whenever it is None."""
    from types import SimpleNamespace

    import service.runtime_state as rs

    monkeypatch.setattr(rs, "publish_threshold", lambda loaded: None)
    metrics = SimpleNamespace(model="m", info={}, activate=lambda: None,
                              deactivate=lambda: None)
    first = SimpleNamespace(metrics=metrics, model_name="m")
    second = SimpleNamespace(metrics=metrics, model_name="m")
    state = rs.RuntimeState(Settings())
    state._swap(first)  # loaded, not warmed yet
    assert state.serving is None
    with pytest.raises(NotReady):
        state.require()
    state.warmed = True
    assert state.serving is first and state.require() is first
    state._swap(second)  # a reload
    assert state.serving is second and state.require() is second
    state.stop()
    assert state.serving is None
    with pytest.raises(NotReady):
        state.require()


def _call(app: Any, path: str, headers: list[tuple[bytes, bytes]] | None = None,
          method: str = "POST") -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through an ASGI app, in a fresh event loop: (status, headers, body)."""
    import asyncio
    from types import SimpleNamespace

    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "query_string": b"", "headers": headers or [],
             "app": SimpleNamespace(state=SimpleNamespace(settings=Settings()))}
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    asyncio.run(app(scope, receive, send))
    start = messages[0]
    assert [k for k, _ in start["headers"]].count(b"x-request-id") == 1
    return (start["status"], dict(start["headers"]),
            b"".join(m.get("body", b"") for m in messages[1:]))


def test_the_middleware_answers_hot_routes_itself_with_the_apps_errors() -> None:
    """A hot route's handler gets its path parameters and runs without the app; what it
    raises is answered as the app's handler would (v1 / v2 body, 500 for the unexpected);
    every answer, the app's too, carries the request id (the client's when valid) once."""
    import re

    from prometheus_client import REGISTRY

    from service.middleware import HotRoute, ServiceMiddleware, send_json

    seen: list[dict[str, str]] = []

    async def hot(scope: Any, receive: Any, send: Any, params: dict[str, str]) -> None:
        seen.append(params)
        if params["name"] == "bad":
            raise ServiceError("no such model", 404, "unknown_model")
        if params["name"] == "boom":
            raise KeyError("x")
        await send_json(send, b'{"ok":true}')

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append({"app": scope["path"]})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-request-id", b"from-the-app")]})
        await send({"type": "http.response.body", "body": b"app"})

    mw = ServiceMiddleware(app, hot=[HotRoute(re.compile(r"/v2/models/(?P<name>[^/]+)/infer"),
                                              "/v2/models/{name}/infer", hot)])

    def count(status: str) -> float:
        return REGISTRY.get_sample_value("conceptguard_requests_total", {
            "endpoint": "/v2/models/{name}/infer", "status": status}) or 0.0

    before = count("200")
    status, headers, body = _call(mw, "/v2/models/m1/infer",
                                  [(b"x-request-id", b"client-7")])
    assert (status, body, headers[b"x-request-id"]) == (200, b'{"ok":true}', b"client-7")
    assert seen == [{"name": "m1"}] and count("200") == before + 1
    status, headers, body = _call(mw, "/v2/models/bad/infer", [(b"x-request-id", b" no")])
    assert (status, json.loads(body)) == (404, {"error": "no such model"})
    assert len(headers[b"x-request-id"]) == 32  # an invalid client id is replaced
    status, _, body = _call(mw, "/v2/models/boom/infer")
    assert (status, json.loads(body)) == (500, {"error": "internal error: KeyError"})
    # not hot: another path, or another method on the same path, goes to the app
    for path, method in (("/v2/models/m1/infer/extra", "POST"), ("/v2/models/m1/infer", "GET")):
        status, headers, body = _call(mw, path, method=method)
        assert (status, body) == (200, b"app") and headers[b"x-request-id"] != b"from-the-app"
    assert seen[-2:] == [{"app": "/v2/models/m1/infer/extra"}, {"app": "/v2/models/m1/infer"}]


def test_v2_json_answers_refuse_non_finite_scores_as_v1() -> None:
    """orjson would write NaN as null: a non-finite score in a JSON output is a 422 (as v1
    answers it); the binary form carries the float as it is."""
    from types import SimpleNamespace

    from service.schemas import InferenceRequest
    from service.v2_binary import rest_response

    scores = _scores(2)
    scores.trust[1] = np.nan
    loaded = SimpleNamespace(model_name="m", bank_id="b")
    req = InferenceRequest.model_validate({"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1], "data": [0.0]}]})
    with pytest.raises(ServiceError) as info:
        rest_response(req, [("trust", False)], loaded, scores)
    assert info.value.status == 422 and "trust" in info.value.message
    binary = rest_response(req, [("trust", True)], loaded, scores)
    assert binary.status_code == 200 and np.isnan(np.frombuffer(binary.body[-8:], "<f4")[1])
    ok = json.loads(rest_response(req, [("reject", False)], loaded, scores).body)
    assert ok["outputs"][0]["data"] == scores.reject.tolist()
