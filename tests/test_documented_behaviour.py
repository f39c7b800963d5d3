"""What README.md and docs/ promise about starting and talking to the service, checked on the
real thing: `conceptguard serve` honours CONCEPTGUARD_BANK, prints its startup line and binds
gRPC to loopback by default; a compressed body is 415; a not-ready 503 has Retry-After;
/docs and /redoc need no network; the offline job names what it is missing."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import (
    DEMO_BANK,
    REPO,
    ServerProcess,
    free_port,
    ready_app_client,
    server_env,
    wait_ready,
)


@pytest.mark.slow
def test_serve_takes_the_bank_from_the_environment_and_logs_its_runtime(tmp_path: Path) -> None:
    banks = tmp_path / "banks"
    shutil.copytree(DEMO_BANK, banks / "mine")
    port, grpc_port = free_port(), free_port()
    env = server_env(banks / "mine", {"grpc_port": grpc_port})  # no CONCEPTGUARD_GRPC_HOST
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:  # no --bank: CONCEPTGUARD_BANK must win
        proc = subprocess.Popen([sys.executable, "-m", "offline.cli", "serve", "--port",
                                 str(port)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess(f"http://127.0.0.1:{port}", port, proc, log_path, env, grpc_port)
    try:
        wait_ready(server)
        bank = httpx.get(f"{server.url}/v1/bank", timeout=10).json()
        assert bank["path"] == "mine", bank  # relative to the banks root: the copy, not demo
        deadline = time.monotonic() + 10
        while "loaded bank" not in server.log_tail(20000) and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server.log_tail(20000)
        line = re.search(r"loaded bank .* backend (\w+), device (\w+), provider (\w+)", log)
        assert line, log
        assert line.groups() == ("onnx", "cpu", "CPUExecutionProvider"), line.group(0)
        assert f"listening on 127.0.0.1:{grpc_port}" in log, log
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


def test_grpc_listens_on_loopback_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import load_settings

    monkeypatch.delenv("CONCEPTGUARD_GRPC_HOST", raising=False)
    assert load_settings().grpc_host == "127.0.0.1"
    monkeypatch.setenv("CONCEPTGUARD_GRPC_HOST", "0.0.0.0")
    assert load_settings().grpc_host == "0.0.0.0"


def test_deploy_files_that_publish_grpc_bind_every_interface() -> None:
    """The container must listen beyond loopback for its published port to work."""
    import yaml

    def grpc_hosts(node: object) -> list[str]:
        """Every value given to CONCEPTGUARD_GRPC_HOST (k8s env lists, compose maps)."""
        found: list[str] = []
        if isinstance(node, dict):
            if node.get("name") == "CONCEPTGUARD_GRPC_HOST":
                found.append(str(node.get("value")))
            if "CONCEPTGUARD_GRPC_HOST" in node:
                found.append(str(node["CONCEPTGUARD_GRPC_HOST"]))
            for value in node.values():
                found += grpc_hosts(value)
        elif isinstance(node, list):
            for value in node:
                found += grpc_hosts(value)
        return found

    assert "CONCEPTGUARD_GRPC_HOST=0.0.0.0" in (REPO / "Dockerfile").read_text()
    for path in ("docker-compose.yml", "deploy/k8s/deployment.yaml",
                 "deploy/kserve/inferenceservice.yaml"):
        docs = list(yaml.safe_load_all((REPO / path).read_text()))
        assert grpc_hosts(docs) and set(grpc_hosts(docs)) == {"0.0.0.0"}, path


@pytest.fixture(scope="module")
def served() -> TestClient:
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(bank=DEMO_BANK, grpc_port=0))
    with ready_app_client(app) as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/monitor",
                                  "/v2/models/fashion-mnist-demo/infer"])
def test_a_compressed_json_body_is_415(served: TestClient, path: str) -> None:
    body = gzip.compress(json.dumps({"images": []}).encode())
    r = served.post(path, content=body, headers={"Content-Type": "application/json",
                                                  "Content-Encoding": "gzip"})
    assert r.status_code == 415, r.text
    message = r.json()["error"]
    message = message["message"] if isinstance(message, dict) else message
    assert "gzip" in message


def test_a_compressed_upload_is_415(served: TestClient) -> None:
    png = (REPO / "examples" / "coat.png").read_bytes()
    r = served.post("/v1/classify", content=gzip.compress(png),
                    headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"


def test_an_identity_encoding_is_accepted(served: TestClient) -> None:
    png = (REPO / "examples" / "coat.png").read_bytes()
    r = served.post("/v1/classify", content=png,
                    headers={"Content-Type": "image/png", "Content-Encoding": "identity"})
    assert r.status_code == 200, r.text


def test_not_ready_is_503_with_retry_after() -> None:
    from service.app import create_app

    client = TestClient(create_app())  # no lifespan: no bank, never ready
    r = client.get("/v2/health/ready")
    assert r.status_code == 503
    assert r.json() == {"ready": False}
    assert r.headers["Retry-After"] == "1"


def test_docs_pages_load_every_asset_from_the_service(served: TestClient) -> None:
    for page, needle in (("/docs", "SwaggerUIBundle"), ("/redoc", "<redoc")):
        r = served.get(page)
        assert r.status_code == 200 and needle in r.text, page
        refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", r.text)
        refs += re.findall(r"""url:\s*['"]([^'"]+)['"]""", r.text)  # swagger's spec url
        assert refs, page
        for ref in refs:
            assert not re.match(r"^[a-z]+:|^//", ref), f"{page} loads {ref} from elsewhere"
            asset = served.get(ref)
            assert asset.status_code == 200, ref
            assert len(asset.content) > 1000, ref
    spec = r.text.split("spec-url=")[-1] if "spec-url=" in r.text else ""
    assert "/openapi.json" in spec or "/openapi.json" in r.text
    assert served.get("/docs/assets/../app.py").status_code == 404


def _demo_config(classifier: Path) -> str:
    text = (REPO / "configs" / "fashion-mnist-demo.yaml").read_text()
    assert "path: models/demo-resnet.safetensors" in text
    return text.replace("path: models/demo-resnet.safetensors", f"path: {classifier}")


def test_build_bank_names_a_missing_classifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    from offline.cli import main

    cfg = tmp_path / "job.yaml"
    cfg.write_text(_demo_config(tmp_path / "absent.safetensors"))
    assert main(["build-bank", "--config", str(cfg), "--out", str(tmp_path / "bank")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "absent.safetensors" in err and "train-demo" in err
    assert not (tmp_path / "bank").exists()


def test_build_bank_without_a_train_section_does_not_advise_train_demo(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config of one's own model (no ``train`` section, as ``init`` writes it) whose
    relative classifier path is missing: the message says what the path resolved against
    and how to make a classifier file, not to train the demo."""
    from offline.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "job.yaml"
    cfg.write_text("name: own\ndata: {source: fashion_mnist}\n"
                   "splits: {fit: 100, reference: 100, calibration: 100}\n"
                   "classifier: {path: ../models/own.safetensors}\n")
    assert main(["build-bank", "--config", str(cfg), "--out", str(tmp_path / "bank")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"current folder, {tmp_path}" in err and "import-classifier" in err
    assert "train-demo" not in err
    assert not (tmp_path / "bank").exists()


def test_build_bank_names_a_config_the_classifier_cannot_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """class_prompts, data.channels or data.image_size that disagree with the classifier's
    spec stop build-bank before any stage, naming the setting (not a tensor shape)."""
    import yaml

    from offline.cli import main

    base = yaml.safe_load(_demo_config(REPO / "banks" / "demo" / "classifier.safetensors"))
    cases = {"class_prompts": (lambda c: c.update(class_prompts=["a", "b", "c"]),
                               "class_prompts has 3 names, the classifier 10 classes"),
             "channels": (lambda c: c["data"].update(channels=3),
                          "data.channels is 3, the classifier takes 1-channel"),
             "image_size": (lambda c: c["data"].update(image_size=32),
                            "data.image_size is 32, the classifier takes 28x28")}
    for name, (change, message) in cases.items():
        cfg = {**base, "data": dict(base["data"])}
        change(cfg)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = tmp_path / name
        assert main(["build-bank", "--config", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not out.exists()


def test_build_bank_names_the_torchattacks_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from conceptguard.attacks import TORCHATTACKS_INSTALL
    from offline.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchattacks" else real(name, *a))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(_demo_config(DEMO_BANK / "classifier.safetensors"))
    capsys.readouterr()
    assert main(["build-bank", "--config", str(cfg), "--out", str(tmp_path / "bank")]) == 2
    err = capsys.readouterr().err.strip()
    assert TORCHATTACKS_INSTALL in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bank").exists()
