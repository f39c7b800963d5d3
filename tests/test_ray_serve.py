"""The demo bank on Ray Serve (local Ray, 2 CPUs, one replica) answers the same predictions
and trust scores as the in-process app that ``conceptguard serve`` runs."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import DEMO_BANK, REPO, free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

EXAMPLES = sorted((REPO / "examples").glob("*.png"))
READY_S = 120.0


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


@pytest.fixture(scope="module")
def ray_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    from service.ray_serve import build

    port = free_port()
    state = tmp_path_factory.mktemp("ray-state")
    os.environ.setdefault("PYTHONPATH", str(REPO))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"env": {"CONCEPTGUARD_BANK": str(DEMO_BANK),
                                 "CONCEPTGUARD_STATE_DIR": str(state)},
                         "num_cpus": 1}),
                  name="conceptguard", route_prefix="/", blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
            _wait_ready(client)
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local_client() -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    app = create_app(load_settings(bank=Path(DEMO_BANK), grpc_port=0))
    with TestClient(app) as client:
        deadline = time.monotonic() + READY_S
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the in-process app never became ready"
            time.sleep(0.1)
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


def test_cli_serve_engine_ray(tmp_path: Path) -> None:
    """``conceptguard serve --engine ray`` starts a local Ray, serves, and Ctrl-C stops it all."""
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
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
