"""The demo bank on Ray Serve (local Ray, 2 CPUs, two replicas of half a CPU each) answers the
same predictions and trust scores as the in-process app that ``conceptguard serve`` runs; a
bank reload on one replica reaches the other; the app's metrics, kept in one
``PROMETHEUS_MULTIPROC_DIR`` for the node, count the requests of both replicas whichever one
answers the scrape."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.ray_serve import REPLICA_HEADER
from tests.conftest import ADMIN_TOKEN, DEMO_BANK, REPO, free_port, ready_app_client

pytestmark = pytest.mark.slow  # starts a local Ray and Ray Serve replicas

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

EXAMPLES = sorted((REPO / "examples").glob("*.png"))
READY_S = 120.0
SHUTDOWN_S = 45.0  # measured: see test_cli_serve_engine_ray
REPLICAS = 2
SECOND_BANK_ID = "fashion-mnist-demo-second-copy"


def _files() -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in EXAMPLES]


def _essentials(body: dict[str, Any]) -> list[dict[str, Any]]:
    """What must agree: label, probabilities, trust, heads, decision, reason (no latency)."""
    return [{k: r[k] for k in ("label", "class_index", "probabilities", "trust", "reject",
                                "reason", "heads", "paper_rule_reject")}
            for r in body["results"]]


def _wait_ready(client: httpx.Client, timeout: float = READY_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get("/v2/health/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError("the Ray Serve replica never became ready")


def _wait_replicas(client: httpx.Client, n: int, timeout: float = READY_S) -> set[str]:
    """Until ``n`` distinct replicas have answered ``/v2/health/ready`` with 200."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < n:
        assert time.monotonic() < deadline, f"only {len(seen)} of {n} replicas ready"
        try:
            r = client.get("/v2/health/ready")
        except httpx.HTTPError:
            time.sleep(0.25)
            continue
        if r.status_code == 200 and r.headers.get(REPLICA_HEADER):
            seen.add(r.headers[REPLICA_HEADER])
        else:
            time.sleep(0.1)
    return seen


def test_cli_serve_engine_ray(tmp_path: Path) -> None:
    """``conceptguard serve --engine ray`` starts a local Ray, serves, and Ctrl-C stops it all.
    First in the module: it runs before the module's own Ray starts, never beside it (two
    local Rays on two CPUs)."""
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCEPTGUARD_")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)  # a local Ray, never a cluster the caller points at
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "offline.cli", "serve", "--engine", "ray", "--bank",
             str(DEMO_BANK), "--port", str(port), "--ray-num-cpus", "2"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
            deadline = time.monotonic() + READY_S
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    if client.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.25)
            body = client.post("/v1/classify", files=_files()[:2]).json()
            assert len(body["results"]) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            # ray.shutdown() of the local Ray takes a few seconds; the bound leaves room for
            # a loaded 2-core machine (it was serve.shutdown(), draining replicas: >60 s)
            assert proc.wait(timeout=SHUTDOWN_S) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A banks root with the demo bank and a second copy of it (another bank_id), one state
    folder and one Prometheus multiprocess folder for the node's replicas."""
    root = tmp_path_factory.mktemp("ray")
    banks = root / "banks"
    shutil.copytree(DEMO_BANK, banks / "demo")
    shutil.copytree(DEMO_BANK, banks / "second")
    manifest = json.loads((banks / "second" / "manifest.json").read_text())
    manifest["bank_id"] = SECOND_BANK_ID
    (banks / "second" / "manifest.json").write_text(json.dumps(manifest))
    for name in ("state", "prometheus"):
        (root / name).mkdir()
    return {"banks": banks, "state": root / "state", "prometheus": root / "prometheus"}


@pytest.fixture(scope="module")
def ray_client(ray_env: dict[str, Path]) -> Iterator[httpx.Client]:
    from service.ray_serve import build

    port = free_port()
    os.environ.setdefault("PYTHONPATH", str(REPO))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"env": {"CONCEPTGUARD_BANK": str(ray_env["banks"] / "demo"),
                                 "CONCEPTGUARD_BANKS_ROOT": str(ray_env["banks"]),
                                 "CONCEPTGUARD_ADMIN_TOKEN": ADMIN_TOKEN,
                                 "CONCEPTGUARD_STATE_DIR": str(ray_env["state"]),
                                 "PROMETHEUS_MULTIPROC_DIR": str(ray_env["prometheus"])},
                         "min_replicas": REPLICAS, "max_replicas": REPLICAS,
                         "num_cpus": 0.5}),
                  name="conceptguard", route_prefix="/", blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
            _wait_ready(client)
            _wait_replicas(client, REPLICAS)
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local_client() -> Iterator[Any]:
    from service.app import create_app
    from service.settings import load_settings

    app = create_app(load_settings(bank=Path(DEMO_BANK), grpc_port=0))
    with ready_app_client(app, timeout=READY_S) as client:
        yield client


def test_ray_serve_matches_the_in_process_app(ray_client: httpx.Client,
                                              local_client: Any) -> None:
    want = local_client.post("/v1/classify", files=_files())
    got = ray_client.post("/v1/classify", files=_files())
    assert want.status_code == got.status_code == 200, got.text
    w, g = _essentials(want.json()), _essentials(got.json())
    assert [r["label"] for r in g] == [r["label"] for r in w]
    for a, b in zip(g, w, strict=True):
        assert a["trust"] == pytest.approx(b["trust"], abs=1e-6)
        assert a["reject"] == b["reject"]
        assert a["heads"] == pytest.approx(b["heads"], abs=1e-6)
    assert got.json()["bank"] == want.json()["bank"]


def test_ray_serve_serves_v2_and_metrics(ray_client: httpx.Client, local_client: Any) -> None:
    name = ray_client.get("/v1/bank").json()["name"]
    meta = ray_client.get(f"/v2/models/{name}")
    assert meta.status_code == 200 and meta.json() == local_client.get(
        f"/v2/models/{name}").json()
    assert ray_client.get(f"/v2/models/{name}/ready").status_code == 200
    text = ray_client.get("/metrics").text
    assert "conceptguard_" in text


def _by_replica(client: httpx.Client, method: str, url: str, n: int = REPLICAS,
                tries: int = 200, **kw: Any) -> dict[str, list[httpx.Response]]:
    """Responses to ``method url``, grouped by the replica that answered, until ``n`` replicas
    answered (Serve's proxy picks the replica; at most ``tries`` requests)."""
    out: dict[str, list[httpx.Response]] = {}
    for _ in range(tries):
        r = client.request(method, url, **kw)
        out.setdefault(r.headers[REPLICA_HEADER], []).append(r)
        if len(out) >= n and sum(map(len, out.values())) >= 4 * n:
            break
    assert len(out) == n, f"{len(out)} of {n} replicas answered {tries} requests"
    return out


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


def test_metrics_of_both_replicas_in_every_scrape(ray_client: httpx.Client) -> None:
    """With one PROMETHEUS_MULTIPROC_DIR for the node, whichever replica answers /metrics
    sums both: the /v1/bank requests both replicas served are all counted."""
    served = _by_replica(ray_client, "GET", "/v1/bank")
    assert all(r.status_code == 200 for rs in served.values() for r in rs)
    total = sum(map(len, served.values()))

    def bank_requests(text: str) -> float:
        return sum(v for labels, v in _samples(text, "conceptguard_requests_total")
                   if labels.get("endpoint") == "/v1/bank" and labels.get("status") == "200")

    scrapes = _by_replica(ray_client, "GET", "/metrics")
    counts = {rid: bank_requests(rs[0].text) for rid, rs in scrapes.items()}
    # the module's earlier tests may have sent a few more; both replicas' requests count
    assert all(c >= total for c in counts.values()), (counts, total)
    assert len(set(counts.values())) == 1, counts  # the same aggregate from both replicas


def test_bank_reload_reaches_every_replica(ray_client: httpx.Client,
                                           ray_env: dict[str, Path]) -> None:
    """POST /v1/bank/reload reaches one replica; both then serve the new bank (GET /v1/bank
    and the bank_info gauge of each replica's process), and a reload back does the same."""
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    before = _by_replica(ray_client, "GET", "/v1/bank")
    assert {r.json()["id"] for rs in before.values() for r in rs} != {SECOND_BANK_ID}
    demo_id = next(iter(before.values()))[0].json()["id"]
    for target, want in (("second", SECOND_BANK_ID), ("demo", demo_id)):
        r = ray_client.post("/v1/bank/reload", json={"path": target}, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["path"] == target
        assert body["workers"]["workers"] == REPLICAS, body  # both replicas acknowledged
        assert body["workers"]["all_serving"] is True, body
        # answered once every replica serves it: no wait needed before asking them
        after = _by_replica(ray_client, "GET", "/v1/bank")
        ids = {rid: {x.json()["id"] for x in rs} for rid, rs in after.items()}
        assert all(v == {want} for v in ids.values()), ids
        metrics = _by_replica(ray_client, "GET", "/metrics")
        info = _samples(next(iter(metrics.values()))[0].text, "conceptguard_bank_info")
        live = {lab["pid"]: lab["bank_id"] for lab, v in info if v == 1 and "pid" in lab}
        assert len(live) >= REPLICAS and set(live.values()) == {want}, live
    pointer = json.loads((ray_env["state"] / "conceptguard-bank.json").read_text())
    assert pointer["path"] == "demo" and pointer["generation"] >= 2


def test_feedback_across_replicas_counts_each_input_once(ray_client: httpx.Client) -> None:
    """Receipts issued by either replica are taken by either one: every label is sent until
    both replicas have answered feedback, each input is counted once whichever replica took
    its first label (the node's state folder holds the ids already counted), and the
    feedback series that both replicas write add up to the inputs labelled."""
    issued = _by_replica(ray_client, "POST", "/v1/classify", files=_files()[:3])
    results = [x for rs in issued.values() for r in rs for x in r.json()["results"]]
    receipts = {x["receipt"]: x["class_index"] for x in results}  # one per input answered
    assert len(receipts) >= 2, results[:2]

    def total(text: str) -> float:
        return sum(v for _, v in _samples(text, "conceptguard_feedback_total"))

    before = total(ray_client.get("/metrics").text)
    counted: dict[str, list[bool]] = {}
    answered_by: set[str] = set()
    for _ in range(10):  # rounds until both replicas have taken feedback
        for receipt, label in receipts.items():
            r = ray_client.post("/v1/feedback", json={"receipt": receipt, "label": label})
            assert r.status_code == 200, r.text
            answered_by.add(r.headers[REPLICA_HEADER])
            counted.setdefault(receipt, []).append(r.json()["counted"])
        if len(answered_by) == REPLICAS:
            break
    assert len(answered_by) == REPLICAS, answered_by
    assert all(c[0] is True and not any(c[1:]) for c in counted.values()), counted
    deadline = time.monotonic() + 10.0  # both replicas' series, read from the shared folder
    while total(ray_client.get("/metrics").text) < before + len(receipts):
        assert time.monotonic() < deadline, "the feedback series never reached the count"
        time.sleep(0.2)
    assert total(ray_client.get("/metrics").text) == before + len(receipts)
