"""Hostile input, malformed banks, confined reloads, metrics born at 0, readiness after
warm-up: nothing a client sends or a bank holds takes the service down (issue 8, items 3,
4, 7, 8, 9, 10, 11). Real servers, real HTTP, real files."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from tests.conftest import (
    ADMIN_TOKEN,
    ServerProcess,
    launch_server,
    metric_samples,
    metric_sum,
)
from tests.test_service_errors import expect_error

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DEEP = b"[" * 1000 + b"]" * 1000


@pytest.fixture(scope="module")
def model(demo_manifest: dict[str, Any]) -> str:
    return demo_manifest["name"]


def _reload(client: httpx.Client, path: str | None) -> httpx.Response:
    body = None if path is None else {"path": path}
    return client.post("/v1/bank/reload", json=body, headers=AUTH, timeout=120.0)


def _failures(client: httpx.Client) -> float:
    return metric_sum(client.get("/metrics").text, "conceptguard_bank_reloads_total",
                      result="failure")


# ---------------------------------------------------------------- hostile JSON (item 8)


def test_deeply_nested_json_is_400_everywhere(client: httpx.Client, model: str) -> None:
    json_ct = {"Content-Type": "application/json"}
    for path, headers in (("/v1/classify", json_ct), ("/v1/classify", {}),
                          ("/v1/monitor", json_ct), ("/v1/bank/reload", {**json_ct, **AUTH}),
                          (f"/v2/models/{model}/infer", json_ct)):
        resp = client.post(path, content=DEEP, headers=headers)
        assert resp.status_code == 400, (path, resp.text)
        assert "nested" in resp.text, resp.text
    assert client.get("/v2/health/ready").status_code == 200


def test_the_binary_header_does_not_switch_the_guard_off_elsewhere(
        client: httpx.Client) -> None:
    """``Inference-Header-Content-Length`` means something on v2 infer only: elsewhere the
    whole body is still checked, whatever the header says."""
    for path in ("/v1/classify", "/v1/monitor", "/v1/feedback"):
        for length in ("0", "x"):
            resp = client.post(path, content=DEEP, headers={
                "Content-Type": "application/json", "Inference-Header-Content-Length": length})
            assert resp.status_code == 400 and "nested" in resp.text, (path, resp.text)


def test_json_routes_read_a_body_without_content_type_as_json(client: httpx.Client) -> None:
    """As /v1/classify and v2 infer do: the same guard (400 invalid_json naming the problem)
    and the same validation (a field named), not 'Input should be a valid dictionary'."""
    for path in ("/v1/monitor", "/v1/feedback"):
        for body, status, says in ((DEEP, 400, "nested"), (b"\xff\xfe{", 400, "UTF-8"),
                                   (b'{"receipt": "x"}', 422, "Field required")):
            resp = client.post(path, content=body)  # no Content-Type header at all
            assert resp.request.headers.get("content-type") is None
            assert resp.status_code == status and says in resp.text, (path, resp.text)


def test_overflowing_sidecar_features_are_422(client: httpx.Client,
                                              demo_manifest: dict[str, Any]) -> None:
    d = demo_manifest["dims"]["features"]
    statuses = []
    for value in (3e38, -3e38, 3.4e38, 1e30, 1e20):
        resp = client.post("/v1/monitor", json={"features": [[value] * d]})
        statuses.append(resp.status_code)
        if resp.status_code == 422:
            expect_error(resp, 422, "invalid_tensor", "non-finite")
        else:  # a finite answer: strict JSON (no NaN / Infinity tokens)
            assert resp.status_code == 200, resp.text
            json.loads(resp.text, parse_constant=lambda c: pytest.fail(c))
    assert statuses[0] == 422, statuses  # 3e38: the projection overflows float32/64
    k = demo_manifest["dims"]["classes"]
    resp = client.post("/v1/monitor", json={"features": [[0.5] * d], "logits": [[3e38] * k]})
    assert resp.status_code in (200, 422), resp.text
    if resp.status_code == 422:
        expect_error(resp, 422, "invalid_tensor")
    ok = client.post("/v1/monitor", json={"features": [[0.5] * d]})
    assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------- contract (item 9)


def test_codes_agree_with_the_docs(client: httpx.Client, model: str, sample_png: bytes) -> None:
    expect_error(client.post("/v1/monitor", content=b"\xff\xfe{}",
                             headers={"Content-Type": "application/json"}), 400, "invalid_json")
    resp = client.post(f"/v2/models/{model}/infer", content=b'{"inputs": []}',
                       headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415, resp.text
    resp = client.post("/v1/monitor", content=b'{"features": [[1]]}',
                       headers={"Content-Type": "text/plain"})
    expect_error(resp, 415, "unsupported_media_type")
    boundary = "cgboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + sample_png[:40]
    resp = client.post("/v1/classify", content=body,
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    expect_error(resp, 400, "invalid_multipart", "truncated")
    for header in ("Bearer", "Basic abc", "bearer"):
        resp = client.post("/v1/bank/reload", headers={"Authorization": header})
        expect_error(resp, 401, "unauthorized")
        assert resp.headers.get("www-authenticate") == "Bearer"
    # "Bearer " with the trailing space (httpx will not send it): over a raw socket
    status = raw_request(client, b"POST /v1/bank/reload HTTP/1.1\r\nHost: x\r\n"
                                 b"Authorization: Bearer \r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 401"), status


def raw_request(client: httpx.Client, data: bytes) -> bytes:
    """Send raw bytes to the server of ``client``; the response's status line."""
    url = httpx.URL(str(client.base_url))
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(data)
        return sock.makefile("rb").readline()


def test_schema_states_what_the_server_enforces(client: httpx.Client, model: str) -> None:
    schema = client.get("/openapi.json").json()
    comps = schema["components"]["schemas"]
    assert comps["MonitorRequest"]["properties"]["features"]["minItems"] == 1
    # the v2 infer body is read by the binary-data codec, so its schema sits inline
    infer = schema["paths"]["/v2/models/{name}/infer"]["post"]
    body = infer["requestBody"]["content"]["application/json"]["schema"]
    shape = body["properties"]["inputs"]["items"]["properties"]["shape"]
    assert shape["items"]["minimum"] == 0
    assert body["properties"]["inputs"]["minItems"] == 1
    for body in ({"images": [""]}, {"images": []}, {"image": ""}):
        expect_error(client.post("/v1/classify", json=body), 422, "invalid_request")
    expect_error(client.post("/v1/monitor", json={"features": []}), 422, "invalid_request")
    expect_error(client.post("/v1/monitor", json={"features": [[]]}), 422, "invalid_request")
    resp = client.post(f"/v2/models/{model}/infer", json={"inputs": []})
    assert resp.status_code == 422, resp.text
    resp = client.post(f"/v2/models/{model}/infer", json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28], "data": [0.0]}]})
    assert resp.status_code == 422, resp.text
    expect_error(client.post("/v1/bank/reload", json={"path": ""}, headers=AUTH), 422,
                 "invalid_request")


# ---------------------------------------------------------------- decoder surface (item 11)


def test_formats_outside_the_allow_list_are_refused(client: httpx.Client) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    resp = client.post("/v1/classify", files={"file": ("x.eps", eps, "image/x-eps")})
    expect_error(resp, 415, "unsupported_format", "EPS")
    buf = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buf, format="PPM")
    resp = client.post("/v1/classify", files={"file": ("x.ppm", buf.getvalue(), "image/x-ppm")})
    expect_error(resp, 415, "unsupported_format")
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (90, 120, 200)).save(buf, format=fmt)
        resp = client.post("/v1/classify", files={"file": (f"x.{fmt}", buf.getvalue(),
                                                           "image/*")})
        assert resp.status_code == 200, (fmt, resp.text)


def test_exif_orientation_is_applied(client: httpx.Client) -> None:
    rng = np.random.default_rng(3)
    upright = rng.integers(0, 256, (56, 28), dtype=np.uint8)  # tall
    stored = Image.fromarray(np.rot90(upright, k=1))  # stored on its side (wide)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged, plain = io.BytesIO(), io.BytesIO()
    stored.save(tagged, format="PNG", exif=exif)
    Image.fromarray(upright).save(plain, format="PNG")
    a = client.post("/v1/classify", files={"file": ("a.png", tagged.getvalue(), "image/png")})
    b = client.post("/v1/classify", files={"file": ("b.png", plain.getvalue(), "image/png")})
    assert a.status_code == b.status_code == 200, a.text + b.text
    assert a.json()["trust"] == pytest.approx(b.json()["trust"], abs=1e-6)
    assert a.json()["probabilities"] == b.json()["probabilities"]


# ---------------------------------------------------------------- bank faults (items 3, 4)


def _rehash(bank: Path) -> None:
    manifest = json.loads((bank / "manifest.json").read_text())
    for name in ("tensors.safetensors", "classifier.onnx", "classifier.safetensors"):
        manifest["files"][name] = hashlib.sha256((bank / name).read_bytes()).hexdigest()
    (bank / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(bank: Path, edit: Any) -> None:
    manifest = json.loads((bank / "manifest.json").read_text())
    edit(manifest)
    (bank / "manifest.json").write_text(json.dumps(manifest))


def _set_tensor(bank: Path, key: str, value: float, index: int | None = None) -> None:
    tensors = load_file(str(bank / "tensors.safetensors"))
    t = tensors[key].copy()
    if index is None:
        t[...] = value
    else:
        t.flat[index] = value
    tensors[key] = t
    save_file(tensors, str(bank / "tensors.safetensors"))
    _rehash(bank)


def _make(banks_root: Path, demo_bank_dir: Path, name: str) -> Path:
    dst = banks_root / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(demo_bank_dir, dst)
    return dst


def test_malformed_banks_are_422_named_and_counted(client: httpx.Client, banks_root: Path,
                                                   demo_bank_dir: Path,
                                                   sample_png: bytes) -> None:
    before = client.get("/v1/bank").json()
    cases: list[tuple[str, Any, str]] = [
        ("nan-tensor", lambda b: _set_tensor(b, "heatmaps.model.ok", float("nan"), 3),
         "heatmaps.model.ok"),
        ("inf-tensor", lambda b: _set_tensor(b, "trust.adversarial.w", float("inf"), 0),
         "trust.adversarial.w"),
        ("zero-scale", lambda b: _set_tensor(b, "trust.anomaly.scale", 0.0), "probe batch"),
        ("non-utf8", lambda b: (b / "manifest.json").write_bytes(
            b'{"schema_version": 1, "name": "\xff\xfe"}'), "UTF-8"),
        ("no-threshold", lambda b: _edit_manifest(b, lambda m: m["threshold"].pop("value")),
         "threshold.value"),
        ("text-threshold", lambda b: _edit_manifest(
            b, lambda m: m["threshold"].update(value="high")), "threshold.value"),
        ("nan-threshold", lambda b: _edit_manifest(
            b, lambda m: m["threshold"].update(value=float("nan"))), "threshold.value"),
        ("no-classes", lambda b: _edit_manifest(b, lambda m: m.pop("classes")), "classes"),
        ("list-manifest", lambda b: (b / "manifest.json").write_text("[]"), "schema_version"),
    ]
    failures = _failures(client)
    for name, damage, mention in cases:
        bank = _make(banks_root, demo_bank_dir, name)
        damage(bank)
        resp = _reload(client, name)
        err = expect_error(resp, 422, "invalid_bank", mention)
        assert str(banks_root) not in err["message"], err
        failures += 1
        assert _failures(client) == failures, name
        shutil.rmtree(bank)
    too_long = _reload(client, "x" * 300)
    expect_error(too_long, 422, "invalid_bank", "255 bytes")
    assert _failures(client) == failures + 1
    # the bank in service never changed
    assert client.get("/v1/bank").json()["id"] == before["id"]
    ok = client.post("/v1/classify", files={"file": ("x.png", sample_png, "image/png")})
    assert ok.status_code == 200, ok.text


def test_odd_report_still_gives_a_bank_summary(client: httpx.Client, banks_root: Path,
                                               demo_bank_dir: Path) -> None:
    bank = _make(banks_root, demo_bank_dir, "odd-report")
    try:
        for report in (b"[]", b"{\"misclassification\": [1, 2]}", b"\xff", b"[" * 5000):
            (bank / "report" / "metrics.json").write_bytes(report)
            assert _reload(client, "odd-report").status_code == 200
            summary = client.get("/v1/bank")
            assert summary.status_code == 200, summary.text
            assert summary.json()["path"] == "odd-report"
    finally:
        assert _reload(client, "demo").status_code == 200
        shutil.rmtree(bank)


def test_reloads_are_confined_to_the_banks_root(client: httpx.Client, banks_root: Path,
                                                tmp_path: Path, demo_bank_dir: Path) -> None:
    outside = tmp_path / "outside-bank"
    shutil.copytree(demo_bank_dir, outside)
    rel_outside = Path("..") / ".." / outside.relative_to(banks_root.parents[1])
    link = banks_root / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    try:
        messages = set()
        for path in (str(rel_outside), str(outside), "../../etc", "/etc",
                     "../no-such-folder-anywhere", "link-out", "demo/../../x"):
            resp = _reload(client, path)
            err = expect_error(resp, 422, "invalid_bank", "not under the banks root")
            messages.add(err["message"].replace(repr(path), "<path>"))
        # one answer for existing and missing folders outside: nothing is disclosed
        assert len(messages) == 1, messages
    finally:
        link.unlink()
    summary = client.get("/v1/bank").json()
    assert summary["path"] == "demo" and not summary["path"].startswith("/")


# ---------------------------------------------------------------- start-up (items 7, 10)


def test_live_at_once_ready_after_warm_up_counters_at_zero(tmp_path: Path,
                                                           sample_png: bytes) -> None:
    # the torch backend takes seconds to load (it imports torch): a window in which the
    # server listens but is not ready, wide enough to observe on any machine
    srv = launch_server(tmp_path / "logs", settings={"admin_token": ADMIN_TOKEN,
                                                     "backend": "torch"})
    try:
        seen_starting = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert srv.alive(), srv.log_tail()
            try:
                live = httpx.get(f"{srv.url}/v2/health/live", timeout=2)
                ready = httpx.get(f"{srv.url}/v2/health/ready", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.02)
                continue
            assert live.status_code == 200
            if ready.status_code == 503:
                seen_starting = True
                early = httpx.post(f"{srv.url}/v1/classify", timeout=5,
                                   files={"file": ("x.png", sample_png, "image/png")})
                if early.status_code == 503:  # still loading: refused, with Retry-After
                    assert early.json()["error"]["code"] == "not_ready"
                    assert early.headers["retry-after"] == "1"
            else:
                assert ready.status_code == 200 and ready.json() == {"ready": True}
                break
            time.sleep(0.02)
        assert seen_starting, "the server never answered live=200 with ready=503"
        text = httpx.get(f"{srv.url}/metrics", timeout=5).text
        for name, labels in (("conceptguard_bank_reloads_total", {"result": "failure"}),
                             ("conceptguard_bank_reloads_total", {"result": "success"}),
                             ("conceptguard_bad_requests_total", {"code": "corrupt"}),
                             ("conceptguard_bad_requests_total", {"code": "invalid_bank"}),
                             ("conceptguard_requests_total",
                              {"endpoint": "/v1/classify", "status": "500"})):
            values = [v for lab, v in metric_samples(text, name)
                      if all(lab.get(k) == want for k, want in labels.items())]
            assert values == [0.0], (name, labels, values)
        # the first sidecar call after ready needs no model loading: the warm-up did it
        with srv.client() as c:
            d = c.get("/v1/bank").json()["classifier"]["feature_dim"]
            assert c.post("/v1/monitor", json={"features": [[0.1] * d]}).status_code == 200
            bad = c.post("/v1/bank/reload", headers=AUTH, json={"path": "nowhere"})
            assert bad.status_code == 422
            text = c.get("/metrics").text
        assert metric_sum(text, "conceptguard_bank_reloads_total", result="failure") == 1
    finally:
        srv.stop()


def test_a_bad_bank_at_startup_exits_naming_it(tmp_path: Path, demo_bank_dir: Path) -> None:
    bank = tmp_path / "bad"
    shutil.copytree(demo_bank_dir, bank)
    _set_tensor(bank, "trust.anomaly.scale", 0.0)  # passes the quick checks, fails the probe
    srv: ServerProcess = launch_server(tmp_path / "logs", bank=bank)
    try:
        srv.process.wait(timeout=120)
        assert srv.process.returncode != 0
        assert "probe batch" in srv.log_tail()
    finally:
        srv.stop()
