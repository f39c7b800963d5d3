"""The serve-time operating point (service/operating.py, service/routes_admin.py): a copy of
the demo bank given a stored operating curve, served in process; the admin call, the
setting, ``GET /v1/bank``, the gauge and the decisions that follow; a bank without a curve."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conceptguard.bank import load_bank
from conceptguard.operating_point import (
    COLUMNS,
    OperatingTarget,
    curve_array,
    operating_curve,
    pick,
)
from conceptguard.scoring import IDENTITY
from service.settings import Settings, SettingsError, load_settings
from tests.conftest import ADMIN_TOKEN, ready_app_client
from tests.fixtures_bank import as_schema2

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PATH = "/v1/admin/operating-point"


def _curve() -> dict:
    """A curve over raw trust in [0, 1] (uniform scores; wrong below 0.3, and 5 of the
    most trusted wrong, so no threshold has zero risk)."""
    raw = np.linspace(0.0, 1.0, 1001)
    wrong = raw < 0.3
    wrong[-5:] = True
    return operating_curve(raw, wrong, np.ones(len(raw)), ~wrong, IDENTITY)


@pytest.fixture(scope="module")
def curve_bank(demo_bank_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo bank with the identity map and a synthetic operating curve in its manifest
    (schema version 3); ``old``: the demo bank as schema version 2 (no curve)."""
    root = tmp_path_factory.mktemp("op-banks")
    bank = root / "curve"
    as_schema2(shutil.copytree(demo_bank_path, bank))  # identity map: raw = calibrated
    m = json.loads((bank / "manifest.json").read_text())
    m["schema_version"] = 3
    m["calibration"]["operating_curve"] = _curve()
    (bank / "manifest.json").write_text(json.dumps(m))
    as_schema2(shutil.copytree(demo_bank_path, root / "old"))
    return bank


def _serve(bank: Path, **settings) -> Iterator[TestClient]:
    from service.app import create_app

    app = create_app(Settings(bank=bank, grpc_port=0, admin_token=ADMIN_TOKEN, **settings))
    with ready_app_client(app) as client:
        yield client


@pytest.fixture(scope="module")
def served(curve_bank: Path) -> Iterator[TestClient]:
    yield from _serve(curve_bank)


def _gauge(client: TestClient) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("conceptguard_reject_threshold{"):
            labels, value = line.rsplit(" ", 1)
            target = labels.split('target="')[1].split('"')[0]
            out[target] = float(value)
    return out


@pytest.mark.slow
def test_admin_call_picks_the_threshold_from_the_curve_and_decisions_follow(
        served: TestClient, curve_bank: Path, sample_png: bytes) -> None:
    own = served.get("/v1/bank").json()["threshold"]
    assert own["source"] == "bank"
    assert _gauge(served)["bank"] == pytest.approx(own["value"], rel=1e-12)

    assert served.put(PATH, json={"target": "coverage", "value": 0.9}).status_code == 401
    r = served.put(PATH, json={"target": "coverage", "value": 0.9}, headers=AUTH)
    assert r.status_code == 200, r.text
    want = pick(curve_array(_curve()), OperatingTarget(target="coverage", value=0.9))
    th = served.get("/v1/bank").json()["threshold"]
    assert th["source"] == "operating point"
    assert th["raw"] == want["threshold_raw"] and th["value"] == want["threshold"]
    assert th["operating_point"]["expected"]["coverage"] >= 0.9
    assert th["bank"]["value"] == own["value"]
    gauge = _gauge(served)
    assert gauge == {"coverage:0.9": th["value"]}  # the bank's series is gone

    # every decision follows the new threshold: trust < value is a reject
    body = served.post("/v1/classify", files={"file": ("x.png", sample_png, "image/png")}).json()
    assert body["reject"] == (body["trust"] < th["value"])
    # the curve's raw scores are uniform (identity map): coverage c puts the threshold near
    # 1 - c; a point just above this input's trust rejects it, one just below accepts it
    t = body["trust"]
    for coverage, rejected in ((1 - t + 0.05, False), (1 - t - 0.05, True)):
        if not 0.0 < coverage < 1.0:
            continue
        r = served.put(PATH, json={"target": "coverage", "value": coverage}, headers=AUTH)
        assert r.status_code == 200, r.text
        again = served.post("/v1/classify",
                            files={"file": ("x.png", sample_png, "image/png")}).json()
        assert again["trust"] == t and again["reject"] is rejected

    r = served.put(PATH, json={"target": "risk", "value": 0.2}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["threshold"]["operating_point"]["expected"]["weighted_risk"] <= 0.2
    assert served.delete(PATH, headers=AUTH).json()["threshold"]["source"] == "bank"
    assert served.get("/v1/bank").json()["threshold"]["value"] == own["value"]


@pytest.mark.slow
@pytest.mark.parametrize(("body", "message"), [
    ({"target": "coverage", "value": 1.5}, "value"),
    ({"target": "coverage", "value": 0}, "value"),
    ({"target": "speed", "value": 0.5}, "target"),
    ({"target": "coverage"}, "value"),
    ({"target": "risk", "value": 1e-6}, "risk 1e-06 is unreachable"),
    ({"target": "coverage", "value": "0.9"}, "value"),  # a string is not a number here
    ({"target": "coverage", "value": True}, "value"),
])
def test_out_of_range_or_unreachable_targets_are_422_and_change_nothing(
        served: TestClient, body: dict, message: str) -> None:
    before = served.get("/v1/bank").json()["threshold"]
    r = served.put(PATH, json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]
    assert served.get("/v1/bank").json()["threshold"] == before


@pytest.mark.slow
def test_a_bank_without_a_curve_answers_409(curve_bank: Path) -> None:
    for client in _serve(curve_bank.parent / "old"):
        r = client.put(PATH, json={"target": "coverage", "value": 0.9}, headers=AUTH)
        assert r.status_code == 409
        assert "has no operating curve" in r.json()["error"]["message"]


@pytest.mark.slow
def test_the_setting_serves_every_load_at_its_point(curve_bank: Path) -> None:
    for client in _serve(curve_bank, operating_point="accept_correct:0.8"):
        th = client.get("/v1/bank").json()["threshold"]
        want = pick(curve_array(_curve()), OperatingTarget(target="accept_correct", value=0.8))
        assert th["source"] == "operating point" and th["raw"] == want["threshold_raw"]
        # a reload of the same folder keeps the point
        assert client.post("/v1/bank/reload", headers=AUTH).status_code == 200
        assert client.get("/v1/bank").json()["threshold"]["raw"] == want["threshold_raw"]


def test_the_setting_is_validated_and_named() -> None:
    assert load_settings(operating_point=" coverage:0.90 ").operating_point == "coverage:0.9"
    assert load_settings(operating_point="").operating_point is None
    for bad, why in (("coverage", "TARGET:VALUE"), ("risk:2", "value"),
                     ("speed:0.5", "target"), ("risk:x", "not a number")):
        with pytest.raises(SettingsError, match="CONCEPTGUARD_OPERATING_POINT") as err:
            load_settings(operating_point=bad)
        assert why in str(err.value)


def test_curve_columns_are_what_the_service_reads(demo_bank_path: Path) -> None:
    assert _curve()["columns"] == list(COLUMNS)
    assert "operating_curve" not in load_bank(demo_bank_path).manifest.calibration or \
        curve_array(load_bank(demo_bank_path).manifest.calibration["operating_curve"]).size


def test_the_bank_pointer_carries_the_operating_point(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from service.lifecycle import SharedBank, _adopt_operating_point

    shared = SharedBank(tmp_path, load_settings(grpc_port=0), host="h", pid=1)
    pointer = tmp_path / "conceptguard-bank.json"
    shared.publish("demo", "coverage:0.9")
    assert json.loads(pointer.read_text())["operating_point"] == "coverage:0.9"
    shared.publish("demo")  # a reload keeps it
    assert json.loads(pointer.read_text())["operating_point"] == "coverage:0.9"
    state = SimpleNamespace(operating_target=None)
    _adopt_operating_point(state, json.loads(pointer.read_text()))
    assert state.operating_target == OperatingTarget(target="coverage", value=0.9)
    shared.publish("demo", None)  # back to the bank's own
    _adopt_operating_point(state, json.loads(pointer.read_text()))
    assert state.operating_target is None
    _adopt_operating_point(state, {"generation": 1, "path": "demo"})  # an older pointer
    assert state.operating_target is None


@pytest.mark.slow
def test_two_workers_move_together(curve_bank: Path, tmp_path: Path) -> None:
    """``conceptguard serve --workers 2``: the admin call answers once both workers serve
    the new threshold; fresh connections (spread over the workers) all see it."""
    import httpx

    from tests.conftest import launch_server, serving_pids, wait_ready

    srv = wait_ready(launch_server(tmp_path / "logs", bank=curve_bank, workers=2,
                                   use_cli=True, settings={"admin_token": ADMIN_TOKEN}))
    try:
        # wait_ready waited for both workers to serve (one bank_info series per pid)
        assert len(serving_pids(httpx.get(f"{srv.url}/metrics", timeout=10).text)) == 2
        r = httpx.put(f"{srv.url}{PATH}", json={"target": "risk", "value": 0.2},
                      headers=AUTH, timeout=90)
        assert r.status_code == 200, r.text
        workers = r.json()["workers"]
        assert workers["workers"] == 2 and workers["all_serving"], workers
        raw = r.json()["threshold"]["raw"]
        seen = set()
        for _ in range(30):
            with httpx.Client(base_url=srv.url, timeout=10) as c:  # a fresh connection
                seen.add(c.get("/v1/bank").json()["threshold"]["raw"])
        assert seen == {raw}
        text = httpx.get(f"{srv.url}/metrics", timeout=10).text
        assert 'target="risk:0.2"' in text
    finally:
        srv.stop()
