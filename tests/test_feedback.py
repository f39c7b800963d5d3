"""Label feedback: signed receipts, counted once, refused when forged, expired or unknown;
request ids in headers and bodies. Unit tests of service/feedback.py and of the request ids
(service/middleware.py), then real servers: two workers sharing the state folder, and a restart."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from service.codecs import Receipt, issue_receipts, read_receipt, sign_receipt, sign_receipts
from service.errors import ServiceError
from service.feedback import KEY_FILE, SEEN_FILE, FeedbackBook, SeenStore, resolve_key
from service.middleware import pick_request_id
from tests.conftest import ServerProcess, encode_png, metric_sum
from tests.test_prometheus_scrape import _per_pid_requests

KEY = b"k" * 32
NOW = 1_800_000_000.0


def _book(tmp_path: Path | None = None, ttl: int = 3600, cap: int = 1000) -> FeedbackBook:
    path = None if tmp_path is None else tmp_path / SEEN_FILE
    return FeedbackBook(KEY, SeenStore(path, ttl, cap), ttl)


def _issue(request_id: str, bank_id: str, classes: list[int], rejects: list[bool],
           reasons: list[str], now: float) -> list[str]:
    """The receipts the service issues under ``KEY`` for a request scored so."""
    scored = SimpleNamespace(predictions=np.array(classes, np.int64),
                             reject=np.array(rejects, bool), reason=reasons)
    return issue_receipts(KEY, request_id, bank_id, scored, now=now)  # type: ignore[arg-type]


def _status(fn: Callable[[], Any]) -> int:
    with pytest.raises(ServiceError) as err:
        fn()
    return err.value.status


# ---------------------------------------------------------------- receipts


def test_receipt_round_trip_and_what_it_certifies() -> None:
    r = Receipt("req-1", 2, 7, True, "unfamiliar", 1_800_000_000, "bank-a")
    token = sign_receipt(r, KEY)
    assert token.startswith("cg1.") and token.count(".") == 2
    assert read_receipt(token, KEY) == r
    assert r.input_id == "req-1#2#"
    # the batch signer makes the very same receipts
    many = sign_receipts('odd "id"', "bank-a", 1_800_000_000, [0, 7], [False, True],
                     ["accepted", "unfamiliar"], KEY, "n1")
    assert many == [sign_receipt(Receipt('odd "id"', 0, 0, False, "accepted", 1_800_000_000,
                                 "bank-a", "n1"), KEY),
                    sign_receipt(Receipt('odd "id"', 1, 7, True, "unfamiliar", 1_800_000_000,
                                 "bank-a", "n1"), KEY)]


def test_two_requests_with_one_client_id_are_counted_apart() -> None:
    book = _book()
    first = _issue("client-7", "bank-a", [1], [False], ["accepted"], now=NOW)
    second = _issue("client-7", "bank-a", [2], [False], ["accepted"], now=NOW)
    assert read_receipt(first[0], KEY).nonce != read_receipt(second[0], KEY).nonce
    assert book.take(first[0], 1, "bank-a", now=NOW).counted
    assert book.take(second[0], 2, "bank-a", now=NOW).counted  # not a duplicate
    assert not book.take(second[0], 2, "bank-a", now=NOW).counted


def test_forged_altered_or_foreign_receipts_are_refused() -> None:
    r = Receipt("req-1", 0, 3, False, "accepted", 1_800_000_000, "bank-a")
    token = sign_receipt(r, KEY)
    head, payload, mac = token.split(".")
    # the payload changed to claim another class: the signature no longer matches
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged[2] = 4  # the class index
    forged_payload = base64.urlsafe_b64encode(
        json.dumps(forged, separators=(",", ":")).encode()).rstrip(b"=").decode()
    assert _status(lambda: read_receipt(f"{head}.{forged_payload}.{mac}", KEY)) == 403
    assert _status(lambda: read_receipt(token, b"another key of 32 bytes........")) == 403
    assert _status(lambda: read_receipt(sign_receipt(r, b"x" * 32), KEY)) == 403
    # a signature part that is not even base64url: altered too
    assert _status(lambda: read_receipt(f"{head}.{payload}.!!!", KEY)) == 403
    assert _status(lambda: read_receipt(f"{head}.{payload}x.{mac}", KEY)) == 403
    for junk in ("", "cg1", "cg1.a", "xx.a.b", "a.b.c.d"):  # not a receipt at all
        assert _status(lambda junk=junk: read_receipt(junk, KEY)) == 422, junk


def test_take_counts_once_and_refuses_expired_other_bank_other_request() -> None:
    book = _book()
    tokens = _issue("req-9", "bank-a", [1, 2], [False, True],
                    ["accepted", "adversarial-like"], now=NOW)
    first = book.take(tokens[0], 1, "bank-a", now=NOW + 5)
    assert first.counted and first.correct and first.receipt.class_index == 1
    again = book.take(tokens[0], 1, "bank-a", now=NOW + 6)
    assert not again.counted  # a duplicate counts once
    second = book.take(tokens[1], 0, "bank-a", now=NOW + 7)
    assert second.counted and not second.correct and second.receipt.reject
    late = _issue("req-10", "bank-a", [0], [False], ["accepted"], now=NOW)
    assert _status(lambda: book.take(late[0], 0, "bank-a", now=NOW + 3601)) == 404
    assert _status(lambda: book.take(late[0], 0, "bank-b", now=NOW + 1)) == 404
    assert _status(lambda: book.take(late[0], 0, "bank-a", "req-11", now=NOW + 1)) == 404
    # the refusals counted nothing: the same receipt still counts once afterwards
    assert book.take(late[0], 0, "bank-a", "req-10", now=NOW + 2).counted


def test_seen_ids_expire_and_are_bounded(tmp_path: Path) -> None:
    store = SeenStore(tmp_path / SEEN_FILE, ttl_s=100, max_entries=3)
    for i in range(3):
        assert store.add(f"a#{i}", int(NOW), NOW)
    assert not store.add("a#0", int(NOW), NOW)  # seen
    assert _status(lambda: store.add("b#0", int(NOW), NOW + 1)) == 503  # full
    # once their receipts expired the old ids are dropped, and room is made
    assert store.add("b#0", int(NOW + 150), NOW + 150)
    rows = sqlite3.connect(tmp_path / SEEN_FILE).execute("SELECT id FROM seen").fetchall()
    assert rows == [("b#0",)]


def test_seen_store_is_shared_through_the_state_folder(tmp_path: Path) -> None:
    """Two stores on one file (two workers, or a restart) see each other's ids."""
    one = SeenStore(tmp_path / SEEN_FILE, 3600, 100)
    other = SeenStore(tmp_path / SEEN_FILE, 3600, 100)
    assert one.add("r#0", int(NOW), NOW)
    assert not other.add("r#0", int(NOW), NOW)
    one.close()
    assert not SeenStore(tmp_path / SEEN_FILE, 3600, 100).add("r#0", int(NOW), NOW)


def test_key_comes_from_the_setting_else_the_state_folder(tmp_path: Path) -> None:
    assert resolve_key("a configured key!", tmp_path) == b"a configured key!"
    assert not (tmp_path / KEY_FILE).exists()
    made = resolve_key(None, tmp_path)
    assert len(made) == 64 and (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert resolve_key(None, tmp_path) == made  # every worker reads the same key
    assert list(tmp_path.iterdir()) == [tmp_path / KEY_FILE]  # no temporary file left
    a, b = resolve_key(None, None), resolve_key(None, None)  # no folder: per process
    assert len(a) == 32 and a != b


def test_request_ids_keep_a_valid_client_id_and_replace_others() -> None:
    assert pick_request_id("order-17:a.b_c") == "order-17:a.b_c"
    for bad in ("", " x", "-x", "a" * 129, "a b", "ü", "x\n"):
        got = pick_request_id(bad)
        assert got != bad and len(got) == 32 and int(got, 16) >= 0
    assert pick_request_id(None) != pick_request_id(None)


# ---------------------------------------------------------------- real servers


def _png(seed: int) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))


def _classify(c: httpx.Client, n: int, seed: int, rid: str | None = None
              ) -> tuple[httpx.Response, list[dict[str, Any]]]:
    headers = {"x-request-id": rid} if rid else {}
    files = [("files", (f"{i}.png", _png(seed + i), "image/png")) for i in range(n)]
    r = c.post("/v1/classify", files=files, headers=headers)
    assert r.status_code == 200, r.text
    return r, r.json()["results"]


def _feedback(url: str, body: dict[str, Any]) -> httpx.Response:
    """One call on its own connection (the kernel spreads them over the workers)."""
    with httpx.Client(base_url=url, timeout=30.0, headers={"Connection": "close"}) as c:
        return c.post("/v1/feedback", json=body)


def test_every_answer_carries_the_request_id(server: ServerProcess,
                                             demo_manifest: dict[str, Any]) -> None:
    with server.client() as c:
        r, results = _classify(c, 2, 0, rid="client-id-1")
        assert r.headers["x-request-id"] == "client-id-1"
        assert r.json()["request_id"] == "client-id-1"
        assert all(verify_shape(res["receipt"]) for res in results)
        single = c.post("/v1/classify", files={"file": ("x.png", _png(5), "image/png")},
                        headers={"x-request-id": "bad id with spaces"})
        rid = single.headers["x-request-id"]
        assert rid != "bad id with spaces" and single.json()["request_id"] == rid
        assert verify_shape(single.json()["receipt"])
        model = demo_manifest["name"]
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                            "data": [base64.b64encode(_png(i)).decode() for i in (1, 2)]}]}
        v2 = c.post(f"/v2/models/{model}/infer", json=body, headers={"x-request-id": "v2-req"})
        assert v2.status_code == 200 and v2.headers["x-request-id"] == "v2-req"
        params = v2.json()["parameters"]
        assert params["request_id"] == "v2-req"
        tokens = params["receipts"].split(",")
        assert len(tokens) == 2 and all(verify_shape(t) for t in tokens)
        # errors carry one too
        bad = c.post("/v1/classify", files={"file": ("x.png", b"nope", "image/png")})
        assert bad.status_code == 400 and len(bad.headers["x-request-id"]) == 32
        missing = c.get("/no/such/path", headers={"x-request-id": "lost-1"})
        assert missing.status_code == 404 and missing.headers["x-request-id"] == "lost-1"


def verify_shape(token: str) -> bool:
    return isinstance(token, str) and token.startswith("cg1.") and token.count(".") == 2


def test_feedback_codes_on_a_real_server(server: ServerProcess,
                                         demo_manifest: dict[str, Any]) -> None:
    classes = demo_manifest["classes"]
    with server.client() as c:
        _, results = _classify(c, 2, 10, rid="fb-codes")
        res = results[0]
        right = _feedback(server.url, {"receipt": res["receipt"], "label": res["label"],
                                       "request_id": "fb-codes"})
        assert right.status_code == 200, right.text
        assert right.json() == {"request_id": "fb-codes", "index": 0, "counted": True,
                                "correct": True,
                                "decision": "reject" if res["reject"] else "accept",
                                "reason": {"accepted": "accepted",
                                           "misclassification-like": "misclassification_like",
                                           "adversarial-like": "adversarial_like",
                                           "unfamiliar": "unfamiliar"}[res["reason"]["kind"]]}
        dup = _feedback(server.url, {"receipt": res["receipt"], "label": res["label"]})
        assert dup.status_code == 200 and dup.json()["counted"] is False
        wrong = (results[1]["class_index"] + 1) % len(classes)
        other = _feedback(server.url, {"receipt": results[1]["receipt"], "label": wrong})
        assert other.status_code == 200 and other.json()["correct"] is False
        head, payload, mac = results[1]["receipt"].split(".")
        forged = _feedback(server.url, {"receipt": f"{head}.{payload}x.{mac}", "label": 0})
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "forbidden"
        unknown = _feedback(server.url, {"receipt": res["receipt"], "label": 0,
                                         "request_id": "never-sent"})
        assert unknown.status_code == 404
        for body in ({"receipt": "not-a-receipt", "label": 0},
                     {"receipt": res["receipt"], "label": "no such class"},
                     {"receipt": res["receipt"], "label": len(classes)},
                     # JSON true and 1.0 are not classes (lax validation took them as 1);
                     # "1" is a name, and no class is called that
                     {"receipt": res["receipt"], "label": True},
                     {"receipt": res["receipt"], "label": 1.0},
                     {"receipt": res["receipt"], "label": "1"},
                     {"receipt": res["receipt"]}, {"label": 0}):
            got = _feedback(server.url, body)
            assert got.status_code == 422, (body, got.text)


def _settled_requests(state: Path, want: int, timeout: float = 10.0) -> Counter[str]:
    """Feedback requests counted by each worker, once they add up to ``want`` (a worker
    counts a request as its answer goes out, so the count can trail the client by a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        per_worker = _per_pid_requests(state, "/v1/feedback")
        if sum(per_worker.values()) >= want or time.monotonic() > deadline:
            return per_worker
        time.sleep(0.1)


def _spread_feedback(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        sem = asyncio.Semaphore(6)

        async def one(body: dict[str, Any]) -> httpx.Response:
            async with sem, httpx.AsyncClient(base_url=url, timeout=60.0) as ac:
                return await ac.post("/v1/feedback", json=body,
                                     headers={"Connection": "close"})

        return await asyncio.gather(*(one(b) for b in bodies))

    return asyncio.run(run())


@pytest.mark.slow
def test_feedback_across_two_workers_counts_each_input_once(
        server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    srv = server_factory(workers=2, use_cli=True,
                         extra_env={"PROMETHEUS_MULTIPROC_DIR": str(state)})
    with srv.client() as c:
        receipts: list[dict[str, Any]] = []
        for k in range(4):
            _, results = _classify(c, 6, 100 + 10 * k)
            receipts += results
    # every label three times, on separate connections: both workers take some
    bodies = [{"receipt": r["receipt"], "label": r["class_index"] if i % 3 else 0}
              for i, r in enumerate(receipts) for _ in range(3)]
    answers = _spread_feedback(srv.url, bodies)
    per_worker = _settled_requests(state, len(answers))
    for _ in range(5):  # the kernel may hand every connection to one worker: send duplicates
        if len(per_worker) == 2:
            break
        answers += _spread_feedback(srv.url, bodies[:12])
        per_worker = _settled_requests(state, len(answers))
    assert [a.status_code for a in answers] == [200] * len(answers)
    counted = [a.json()["counted"] for a in answers]
    assert sum(counted) == len(receipts)  # once per input, whichever worker took it
    assert len(per_worker) == 2 and sum(per_worker.values()) == len(answers), per_worker
    deadline = time.monotonic() + 10.0
    with srv.client() as c:  # the series are read from every worker's file; let them settle
        text = c.get("/metrics").text
        while metric_sum(text, "conceptguard_feedback_total") < len(receipts) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
            text = c.get("/metrics").text
    assert metric_sum(text, "conceptguard_feedback_total") == len(receipts)
    want_correct = sum(1 for i, r in enumerate(receipts) if i % 3 or r["class_index"] == 0)
    assert metric_sum(text, "conceptguard_feedback_correct_total") == want_correct
    rejected = sum(1 for r in receipts if r["reject"])
    assert metric_sum(text, "conceptguard_feedback_total", decision="reject") == rejected
    assert (state / KEY_FILE).exists() and (state / SEEN_FILE).exists()


@pytest.mark.slow
def test_receipts_survive_a_restart_and_a_new_key_refuses_them(
        server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    env = {"CONCEPTGUARD_STATE_DIR": str(state)}
    first = server_factory(extra_env=env)
    with first.client() as c:
        _, results = _classify(c, 3, 200)
    assert _feedback(first.url, {"receipt": results[0]["receipt"],
                                 "label": 0}).json()["counted"]
    first.stop()
    # the same state folder: the key file and the ids already counted are still there
    second = server_factory(extra_env=env)
    again = _feedback(second.url, {"receipt": results[0]["receipt"], "label": 0})
    assert again.status_code == 200 and again.json()["counted"] is False
    fresh = _feedback(second.url, {"receipt": results[1]["receipt"], "label": 1})
    assert fresh.status_code == 200 and fresh.json()["counted"] is True
    second.stop()
    # a configured key that is not the one the receipts were signed with: 403
    third = server_factory(extra_env=env, settings={"feedback_key": "another key, 16+ chars"})
    refused = _feedback(third.url, {"receipt": results[2]["receipt"], "label": 1})
    assert refused.status_code == 403


def test_the_feedback_store_is_opened_at_startup_not_by_a_first_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_bank_dir: Path) -> None:
    # several workers opening it on their first requests raced for the database's lock
    # (a 500 for the loser); at startup each waits its turn, off the event loop
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    monkeypatch.setenv("CONCEPTGUARD_STATE_DIR", str(tmp_path))
    app = create_app(Settings(bank=demo_bank_dir, grpc_port=0))
    with TestClient(app):  # the lifespan ran; no request was sent
        assert app.state.feedback_book is not None
        assert (tmp_path / SEEN_FILE).is_file() and (tmp_path / KEY_FILE).is_file()
        tables = sqlite3.connect(tmp_path / SEEN_FILE).execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        assert ("seen",) in tables


def test_an_unusable_state_folder_stops_the_startup_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_bank_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    (tmp_path / SEEN_FILE).mkdir()  # a folder where the database file should be
    monkeypatch.setenv("CONCEPTGUARD_STATE_DIR", str(tmp_path))
    app = create_app(Settings(bank=demo_bank_dir, grpc_port=0))
    with pytest.raises(sqlite3.Error), TestClient(app):
        pass
    assert "cannot open the feedback store in the state folder" in caplog.text
    assert str(tmp_path) in caplog.text
