"""The inference-logger sink: KServe's logger CloudEvents (binary mode) made with the
``cloudevents`` SDK, replayed to a real server. Unit tests of service/sink.py first."""

from __future__ import annotations

import base64
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent

from service.errors import ServiceError
from service.sink import Pairs, read_head, request_as_v2, served_predictions
from tests.conftest import ServerProcess, encode_png, metric_sum, ready_app_client

REQ = "org.kubeflow.serving.inference.request"
RESP = "org.kubeflow.serving.inference.response"
CLASSES = ["a", "b", "c"]


def event(kind: str, event_id: str, data: Any) -> tuple[dict[str, str], bytes]:
    """A binary-mode CloudEvent as KServe's logger sends it: headers and body."""
    ev = CloudEvent({"type": REQ if kind == "request" else RESP, "id": event_id,
                     "source": "http://localhost:9081/", "datacontenttype": "application/json",
                     "inferenceservicename": "fmnist", "namespace": "default",
                     "endpoint": "default"}, data)
    headers, body = to_binary(ev)
    return dict(headers), body


def _status(fn: Callable[[], Any]) -> int:
    with pytest.raises(ServiceError) as err:
        fn()
    return err.value.status


# ---------------------------------------------------------------- unit


def test_read_head_takes_binary_mode_events() -> None:
    headers, _ = event("request", "r-1", {"instances": [1]})
    head = read_head(headers)
    assert (head.id, head.kind, head.type) == ("r-1", "request", REQ)
    assert read_head(event("response", "r-1", {"predictions": [1]})[0]).kind == "response"
    for drop in ("ce-id", "ce-type", "ce-source", "ce-specversion"):
        assert _status(lambda d=drop: read_head({k: v for k, v in headers.items()
                                                 if k != d})) == 400
    assert _status(lambda: read_head({**headers, "ce-type": "com.example.other"})) == 400
    assert _status(lambda: read_head({**headers, "ce-specversion": "9.9"})) == 400
    assert _status(lambda: read_head({**headers, "content-type": "text/plain"})) == 415
    s_headers, _ = to_structured(CloudEvent({"type": REQ, "source": "s", "id": "x"}, {"a": 1}))
    assert _status(lambda: read_head(dict(s_headers))) == 415


def test_request_payloads_v1_and_v2() -> None:
    png = base64.b64encode(encode_png(np.zeros((28, 28), np.uint8))).decode()
    for instances in ([png, png], [{"b64": png}], [{"image_bytes": {"b64": png}}]):
        body = request_as_v2({"instances": instances}, channels=1)
        (inp,) = body["inputs"]
        assert inp["name"] == "image" and inp["shape"] == [len(instances)]
    pixels = request_as_v2({"instances": np.full((2, 28, 28), 0.5).tolist()}, channels=1)
    assert pixels["inputs"][0]["shape"] == [2, 1, 28, 28]
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [png]}]}
    assert request_as_v2(v2, channels=1) is v2
    assert _status(lambda: request_as_v2({"instances": []}, 1)) == 422
    assert _status(lambda: request_as_v2([1, 2], 1)) == 422
    assert _status(lambda: request_as_v2({"instances": [[1, 2], [3]]}, 1)) == 422
    assert _status(lambda: request_as_v2({"instances": ["@@not base64@@"]}, 1)) == 400


def test_served_predictions_v1_and_v2() -> None:
    assert served_predictions({"predictions": [2, 0]}, CLASSES) == [2, 0]
    assert served_predictions({"predictions": ["c", "a"]}, CLASSES) == [2, 0]
    assert served_predictions({"predictions": [[0.1, 0.7, 0.2]]}, CLASSES) == [1]
    assert served_predictions({"predictions": [{"class_index": 1}, {"label": "c"},
                                               {"probabilities": [0.9, 0.05, 0.05]}]},
                              CLASSES) == [1, 2, 0]
    v2_int = {"outputs": [{"name": "p", "datatype": "FP32", "shape": [2, 3],
                           "data": [0.1, 0.2, 0.7, 0.6, 0.3, 0.1]},
                          {"name": "class_index", "datatype": "INT64", "shape": [2],
                           "data": [1, 1]}]}
    assert served_predictions(v2_int, CLASSES) == [1, 1]  # indexes before scores
    v2_scores = {"outputs": [v2_int["outputs"][0]]}
    assert served_predictions(v2_scores, CLASSES) == [2, 0]
    v2_names = {"outputs": [{"name": "label", "datatype": "BYTES", "shape": [1],
                             "data": ["b"]}]}
    assert served_predictions(v2_names, CLASSES) == [1]
    for junk in ({"predictions": [7]}, {"predictions": ["zz"]}, {"outputs": []}, {"x": 1},
                 [1], {"predictions": [[0.5, 0.5]]}):
        assert served_predictions(junk, CLASSES) is None, junk


def test_pairs_match_in_either_order_and_stay_bounded() -> None:
    pairs = Pairs(ttl_s=10.0, cap=3)
    assert pairs.monitored("x", [1, 2], now=0.0) is None
    done = pairs.served("x", [1, 0], now=1.0)
    assert done is not None and (done.agree, done.disagree, done.unreadable) == (1, 1, False)
    assert pairs.served("y", [2], now=2.0) is None  # the response came first
    done = pairs.monitored("y", [2], now=2.5)
    assert done is not None and (done.agree, done.disagree) == (1, 0)
    assert pairs.monitored("z", [0], now=3.0) is None
    done = pairs.served("z", None, now=3.5)  # a response this reader cannot read
    assert done is not None and done.unreadable
    assert len(pairs) == 0
    for i in range(5):  # more halves than the cap: the oldest are evicted
        pairs.monitored(f"w{i}", [0], now=4.0 + i)
    assert len(pairs) == 3 and pairs.evicted == 2
    pairs.expire(now=100.0)  # and none waits longer than the TTL
    assert len(pairs) == 0 and pairs.expired == 3


def test_pairs_in_a_shared_file_pair_across_tables_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "pairs.sqlite"
    a, b = Pairs(60.0, 100, path), Pairs(60.0, 100, path)  # two workers of one host
    assert a.monitored("x", [1, 2], now=0.0) is None
    done = b.served("x", [1, 1], now=1.0)  # the other half reached the other worker
    assert done is not None and (done.agree, done.disagree) == (1, 1)
    assert len(a) == 0 and len(b) == 0
    assert b.served("y", [0], now=2.0) is None
    b.close()
    a.close()
    restarted = Pairs(60.0, 100, path)  # the halves still waiting outlive the processes
    assert len(restarted) == 1
    done = restarted.monitored("y", [0], now=3.0)
    assert done is not None and (done.agree, done.disagree) == (1, 0)
    assert restarted.served("z", [0], now=4.0) is None
    restarted.expire(now=65.0)  # the TTL runs on wall-clock time, which processes share
    assert len(restarted) == 0 and restarted.expired == 1


def _one_half_each(path: str, kind: str, n: int, out: multiprocessing.Queue) -> None:
    pairs = Pairs(60.0, 10 * n, Path(path))
    now = time.time()
    done = [pairs.monitored(f"e{i}", [i % 3], now) if kind == "monitored"
            else pairs.served(f"e{i}", [i % 3 if i % 4 else 9], now) for i in range(n)]
    out.put([(d.agree, d.disagree) for d in done if d is not None])


def test_two_processes_racing_on_the_same_ids_pair_each_once(tmp_path: Path) -> None:
    """One process takes every request half, another every response half, at the same
    time: each id is paired exactly once (one transaction per step), whoever comes last."""
    n, path = 300, str(tmp_path / "pairs.sqlite")
    Pairs(60.0, 10 * n, Path(path)).close()  # the table exists before the race
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_one_half_each, args=(path, kind, n, out))
             for kind in ("monitored", "served")]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    pairs = [r for got in results for r in got]
    assert len(pairs) == n  # every id once, by one of the two
    assert sum(a for a, _ in pairs) == sum(1 for i in range(n) if i % 4)
    assert sum(d for _, d in pairs) == sum(1 for i in range(n) if not i % 4)
    assert len(Pairs(60.0, 10 * n, Path(path))) == 0


# ---------------------------------------------------------------- a real server


def _pngs(images: np.ndarray) -> list[str]:
    return [base64.b64encode(encode_png(im)).decode() for im in images]


def _wait_metric(server: ServerProcess, name: str, want: float, timeout: float = 60.0,
                 **labels: str) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        with server.client() as c:
            text = c.get("/metrics").text
        if metric_sum(text, name, **labels) >= want:
            return text
        time.sleep(0.2)
    pytest.fail(f"{name}{labels} stayed at {metric_sum(text, name, **labels)}, want {want}")


def replay(server: ServerProcess, images: np.ndarray, model_classes: list[str]) -> dict[str, Any]:
    """Good v1 and v2 request/response events with bad ones in between; returns what the
    good ones should add up to."""
    with server.client() as c:
        r = c.post("/v1/classify", files=[("files", (f"{i}.png", encode_png(im), "image/png"))
                                          for i, im in enumerate(images)])
    assert r.status_code == 200 and "results" in r.json(), (r.status_code, r.text[:500])
    truth = r.json()["results"]
    bank_classes = [r["class_index"] for r in truth]
    pngs = _pngs(images)
    good: list[tuple[dict[str, str], bytes]] = []
    bad: list[tuple[dict[str, str], bytes, int]] = []
    n_in, agree, disagree = 0, 0, 0
    for k in range(0, len(images), 4):
        ids, chunk = f"evt-{k}", slice(k, k + 4)
        cls = bank_classes[chunk]
        if k % 8 == 0:  # v1: base64 instances, class-index predictions (one of them wrong)
            req = {"instances": [{"image_bytes": {"b64": s}} for s in pngs[chunk]]}
            served = [*cls[:-1], (cls[-1] + 1) % len(model_classes)]
            resp: dict[str, Any] = {"predictions": served}
        else:  # v2: the service's own inputs, class names out
            req = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(cls)],
                               "data": pngs[chunk]}]}
            served = cls
            resp = {"model_name": "fmnist", "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [len(cls)],
                 "data": [model_classes[c] for c in cls]}]}
        n_in += len(cls)
        agree += sum(int(a == b) for a, b in zip(cls, served, strict=True))
        disagree += sum(int(a != b) for a, b in zip(cls, served, strict=True))
        if k % 12 == 0:  # the response before its request
            good += [event("response", ids, resp), event("request", ids, req)]
        else:
            good += [event("request", ids, req), event("response", ids, resp)]
        # a bad event beside every good pair
        h, b = event("request", f"bad-{k}", req)
        bad.append([({k2: v for k2, v in h.items() if k2 != "ce-id"}, b, 400),
                    ({**h, "ce-type": "com.example.unrelated"}, b, 400),
                    (h, b"{not json", 400),
                    (event("request", f"bad-{k}", {"instances": []})[0],
                     event("request", f"bad-{k}", {"instances": []})[1], 422),
                    (event("request", f"bad-{k}", {"rows": [1]})[0],
                     event("request", f"bad-{k}", {"rows": [1]})[1], 422)][k // 4 % 5])
    statuses = []
    n_bad = len(bad)
    with server.client() as c:
        for i, (h, b) in enumerate(good):
            t0 = time.perf_counter()
            r = c.post("/v1/events", headers=h, content=b)
            statuses.append((r.status_code, time.perf_counter() - t0))
            if i % 2 == 1 and bad:
                bh, bb, want = bad.pop()
                rb = c.post("/v1/events", headers=bh, content=bb)
                assert rb.status_code == want, (rb.status_code, rb.text, bh)
        # a well-formed event whose image does not decode: accepted, then counted failed
        corrupt = event("request", "evt-corrupt",
                        {"instances": [base64.b64encode(b"\x89PNG broken").decode()]})
        r = c.post("/v1/events", headers=corrupt[0], content=corrupt[1])
        assert r.status_code == 202, r.text
        assert r.json() == {"accepted": True, "id": "evt-corrupt", "type": "request"}
    assert all(s == 202 for s, _ in statuses), statuses
    median_ms = float(np.median([t for _, t in statuses])) * 1e3
    print(f"{len(statuses)} good events answered 202 in {median_ms:.2f} ms (median, client "
          f"side), {n_bad} bad ones refused")
    assert not bad  # every bad event was sent, each beside a good pair
    return {"bad": n_bad, "inputs": n_in, "agree": agree, "disagree": disagree,
            "requests": len(good) // 2, "classified": len(images)}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_replayed_events_are_monitored_and_bad_ones_refused(
        workers: int, server_factory: Callable[..., ServerProcess], tmp_path: Path,
        fashion_mnist_test: Any, demo_manifest: dict[str, Any]) -> None:
    if workers == 1:
        srv = server_factory()
    else:
        mp = tmp_path / "mp"
        mp.mkdir()
        srv = server_factory(workers=2, use_cli=True,
                             extra_env={"PROMETHEUS_MULTIPROC_DIR": str(mp)})
    images = np.asarray(fashion_mnist_test.images[200:232])
    want = replay(srv, images, demo_manifest["classes"])
    # every good request event is scored, in the background, into the usual metrics
    text = _wait_metric(srv, "conceptguard_sink_events_total", want["requests"],
                        type="request", result="monitored")
    text = _wait_metric(srv, "conceptguard_sink_events_total", 1, type="request",
                        result="failed")
    # a scrape writes its own worker's queued scores; the other worker's within FLUSH_S
    text = _wait_metric(srv, "conceptguard_predictions_total",
                        want["classified"] + want["inputs"])
    assert metric_sum(text, "conceptguard_sink_events_total", type="request",
                      result="monitored") == want["requests"]
    assert metric_sum(text, "conceptguard_predictions_total") == want["classified"] + want[
        "inputs"]
    assert metric_sum(text, "conceptguard_sink_events_total", type="request",
                      result="accepted") == want["requests"] + 1
    assert metric_sum(text, "conceptguard_sink_events_total", type="response",
                      result="accepted") == want["requests"]
    invalid = metric_sum(text, "conceptguard_sink_events_total", result="invalid")
    assert invalid == want["bad"]
    # every pair is matched, its halves at one worker or two (one table in the state folder)
    _wait_metric(srv, "conceptguard_sink_pairs_total", want["agree"], result="agree")
    text = _wait_metric(srv, "conceptguard_sink_pairs_total", want["disagree"],
                        result="disagree")
    assert metric_sum(text, "conceptguard_sink_pairs_total", result="agree") == want["agree"]
    assert metric_sum(text, "conceptguard_sink_pairs_total",
                      result="disagree") == want["disagree"]
    for dropped in ("expired", "evicted", "unreadable"):
        assert metric_sum(text, "conceptguard_sink_pairs_total", result=dropped) == 0


@pytest.mark.slow
def test_halves_pair_across_servers_sharing_a_state_folder(
        server_factory: Callable[..., ServerProcess], tmp_path: Path, fashion_mnist_test: Any,
        demo_manifest: dict[str, Any]) -> None:
    """Two servers (as two workers or replicas of one host) with one state folder: every
    pair whose halves went to different servers is matched once, in either order."""
    state = tmp_path / "state"
    state.mkdir()
    env = {"CONCEPTGUARD_STATE_DIR": str(state)}
    a, b = server_factory(extra_env=env), server_factory(extra_env=env)
    images = np.asarray(fashion_mnist_test.images[320:328])
    with a.client() as c:
        r = c.post("/v1/classify", files=[("files", (f"{i}.png", encode_png(im), "image/png"))
                                          for i, im in enumerate(images)])
    assert r.status_code == 200, r.text
    cls = [x["class_index"] for x in r.json()["results"]]
    pngs, k = _pngs(images), len(demo_manifest["classes"])
    with a.client() as ca, b.client() as cb:
        for i in range(len(images)):
            served = [cls[i] if i % 2 else (cls[i] + 1) % k]  # the even ones disagree
            req = event("request", f"x-{i}", {"instances": [pngs[i]]})
            resp = event("response", f"x-{i}", {"predictions": served})
            first, second = (ca, cb) if i % 4 < 2 else (cb, ca)
            for client, (h, body) in ((first, req), (second, resp)) if i % 3 else (
                    (second, resp), (first, req)):
                assert client.post("/v1/events", headers=h, content=body).status_code == 202

    def paired(result: str) -> float:
        total = 0.0
        for srv in (a, b):
            with srv.client() as c:
                total += metric_sum(c.get("/metrics").text, "conceptguard_sink_pairs_total",
                                    result=result)
        return total

    deadline = time.monotonic() + 60
    while paired("agree") + paired("disagree") < len(images) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (paired("agree"), paired("disagree")) == (len(images) / 2, len(images) / 2)
    assert paired("expired") == paired("evicted") == paired("unreadable") == 0


@pytest.mark.slow
def test_halves_waiting_outlive_a_restart(server_factory: Callable[..., ServerProcess],
                                          tmp_path: Path, fashion_mnist_test: Any,
                                          demo_manifest: dict[str, Any]) -> None:
    """A request event monitored before a restart pairs with its response after it: the
    table is in the state folder, which outlives the process."""
    state = tmp_path / "state"
    state.mkdir()
    env = {"CONCEPTGUARD_STATE_DIR": str(state)}
    images = np.asarray(fashion_mnist_test.images[300:306])
    first = server_factory(extra_env=env)
    with first.client() as c:
        r = c.post("/v1/classify", files=[("files", (f"{i}.png", encode_png(im), "image/png"))
                                          for i, im in enumerate(images)])
        assert r.status_code == 200, r.text
        cls = [x["class_index"] for x in r.json()["results"]]
        h, b = event("request", "evt-restart", {"instances": _pngs(images)})
        assert c.post("/v1/events", headers=h, content=b).status_code == 202
    _wait_metric(first, "conceptguard_sink_events_total", 1, type="request",
                 result="monitored")
    first.stop()
    assert first.process.returncode is not None
    second = server_factory(extra_env=env)
    served = [*cls[:-1], (cls[-1] + 1) % len(demo_manifest["classes"])]
    with second.client() as c:
        h, b = event("response", "evt-restart", {"predictions": served})
        assert c.post("/v1/events", headers=h, content=b).status_code == 202
    text = _wait_metric(second, "conceptguard_sink_pairs_total", len(cls) - 1, result="agree")
    assert metric_sum(text, "conceptguard_sink_pairs_total", result="disagree") == 1


def test_sink_answers_before_scoring(server: ServerProcess) -> None:
    """202 comes back whatever the image holds: decoding happens after the answer."""
    with server.client() as c:
        h, b = event("request", "early-1", {"instances": [base64.b64encode(b"junk").decode()]})
        r = c.post("/v1/events", headers=h, content=b)
        assert r.status_code == 202 and r.headers["x-request-id"]
        h, b = event("response", "early-1", {"predictions": [0]})
        assert c.post("/v1/events", headers=h, content=b).status_code == 202
        assert c.post("/v1/events", content=b"{}",
                      headers={"content-type": "application/json"}).status_code == 400


def test_the_pairing_table_is_opened_off_the_event_loop(
        monkeypatch: pytest.MonkeyPatch, demo_bank_dir: Path) -> None:
    # opening it may wait (up to seconds) for another worker's lock on a new database
    import asyncio

    from service import routes_sink
    from service.app import create_app
    from service.settings import Settings

    made_on: list[str] = []
    real = routes_sink.Sink

    def recording_sink() -> Any:
        try:
            asyncio.get_running_loop()
            made_on.append("event loop")
        except RuntimeError:
            made_on.append("worker thread")
        return real()

    monkeypatch.setattr(routes_sink, "Sink", recording_sink)
    app = create_app(Settings(bank=demo_bank_dir, grpc_port=0))
    with ready_app_client(app) as c:
        for k in range(2):
            h, b = event("response", f"r-{k}", {"predictions": [1]})
            assert c.post("/v1/events", headers=h, content=b).status_code == 202
    assert made_on == ["worker thread"]  # once, and not on the loop
