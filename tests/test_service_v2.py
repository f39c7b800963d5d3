"""Open Inference Protocol v2 over real HTTP: health, metadata, infer (BYTES and FP32),
output filtering, unknown models, protocol errors."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import encode_png
from tests.tolerance import assert_f32_close

OUTPUT_TYPES = {"probabilities": "FP32", "label": "BYTES", "class_index": "INT64",
                "trust": "FP32", "reject": "BOOL", "p_misclassification": "FP32",
                "p_anomaly": "FP32", "p_adversarial": "FP32", "p_unfamiliar": "FP32",
                "reason_kind": "BYTES",
                "reason_concepts": "BYTES", "reason_contributions": "FP32",
                "paper_rule_reject": "BOOL"}


@pytest.fixture(scope="module")
def model(demo_manifest: dict[str, Any]) -> str:
    return demo_manifest["name"]


@pytest.fixture(scope="module")
def images(fashion_mnist_test: Any) -> np.ndarray:
    return fashion_mnist_test.images[:3]


def bytes_input(images: np.ndarray) -> dict[str, Any]:
    return {"name": "image", "datatype": "BYTES", "shape": [len(images)],
            "data": [base64.b64encode(encode_png(im)).decode() for im in images]}


def fp32_input(images: np.ndarray, nested: bool = False) -> dict[str, Any]:
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return {"name": "input", "datatype": "FP32", "shape": list(x.shape),
            "data": x.tolist() if nested else x.ravel().tolist()}


def outputs_by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in body["outputs"]}


def test_health_and_server_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "conceptguard" and "version" in meta


def test_model_metadata_and_ready(client: httpx.Client, model: str,
                                  demo_manifest: dict[str, Any]) -> None:
    meta = client.get(f"/v2/models/{model}").json()
    assert meta["name"] == model
    assert meta["versions"] == [demo_manifest["bank_id"]]
    assert meta["platform"] == "onnxruntime_onnx"
    inputs = {i["name"]: i for i in meta["inputs"]}
    size = demo_manifest["preprocessing"]["input_size"]
    channels = demo_manifest["preprocessing"]["channels"]
    assert inputs["image"] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
    assert inputs["input"]["shape"] == [-1, channels, size, size]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert {k: v["datatype"] for k, v in outputs.items()} == OUTPUT_TYPES
    assert outputs["probabilities"]["shape"] == [-1, demo_manifest["dims"]["classes"]]
    assert client.get(f"/v2/models/{model}/ready").json() == {"name": model, "ready": True}
    version = demo_manifest["bank_id"]
    assert client.get(f"/v2/models/{model}/versions/{version}").json() == meta
    assert client.get(f"/v2/models/{model}/versions/{version}/ready").status_code == 200


def test_unknown_model_and_version_are_404(client: httpx.Client, model: str,
                                           images: np.ndarray) -> None:
    for path in ("/v2/models/no-such-model", "/v2/models/no-such-model/ready",
                 f"/v2/models/{model}/versions/0"):
        resp = client.get(path)
        assert resp.status_code == 404 and isinstance(resp.json()["error"], str)
    resp = client.post("/v2/models/no-such-model/infer", json={"inputs": [bytes_input(images)]})
    assert resp.status_code == 404 and "no-such-model" in resp.json()["error"]


def test_infer_bytes_and_fp32_agree_with_v1(client: httpx.Client, model: str,
                                            images: np.ndarray,
                                            demo_manifest: dict[str, Any]) -> None:
    v1 = client.post("/v1/classify", files=[("files", (f"{i}.png", encode_png(im), "image/png"))
                                            for i, im in enumerate(images)]).json()["results"]
    n, k = len(images), demo_manifest["dims"]["classes"]
    bodies = []
    for inp in (bytes_input(images), fp32_input(images), fp32_input(images, nested=True)):
        resp = client.post(f"/v2/models/{model}/infer", json={"id": "req-7", "inputs": [inp]})
        assert resp.status_code == 200, resp.text
        bodies.append(resp.json())
    for body in bodies:
        assert body["model_name"] == model and body["id"] == "req-7"
        assert body["model_version"] == demo_manifest["bank_id"]
        out = outputs_by_name(body)
        assert {name: o["datatype"] for name, o in out.items()} == OUTPUT_TYPES
        assert out["probabilities"]["shape"] == [n, k]
        probs = np.array(out["probabilities"]["data"]).reshape(n, k)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        for name in ("label", "class_index", "trust", "reject", "p_misclassification",
                     "p_adversarial"):
            assert out[name]["shape"] == [n] and len(out[name]["data"]) == n
        assert out["label"]["data"] == [r["label"] for r in v1]
        assert out["class_index"]["data"] == [r["class_index"] for r in v1]
        assert out["reject"]["data"] == [r["reject"] for r in v1]
        assert_f32_close(out["trust"]["data"], [r["trust"] for r in v1], terms=1)
        assert_f32_close(out["p_adversarial"]["data"],
                         [r["heads"]["adversarial"] for r in v1], terms=1)
        assert_f32_close(out["p_unfamiliar"]["data"],
                         [r["heads"]["unfamiliar"] for r in v1], terms=1)
        assert_f32_close(out["p_anomaly"]["data"],
                         [r["heads"]["anomaly"] for r in v1], terms=1)
        # the "why", as v1 gives it: reason kind, top concepts, their contributions
        assert out["reason_kind"]["data"] == [r["reason"]["kind"] for r in v1]
        concepts = [[c["concept"] for c in r["reason"]["concepts"]] for r in v1]
        per_input = len(concepts[0])
        assert per_input > 0 and out["reason_concepts"]["shape"] == [n, per_input]
        assert np.array(out["reason_concepts"]["data"]).reshape(n, -1).tolist() == concepts
        want = np.array([[c["contribution"] for c in r["reason"]["concepts"]] for r in v1])
        got = np.array(out["reason_contributions"]["data"]).reshape(n, -1)
        tol = 8 * np.finfo(np.float32).eps * max(float(np.abs(want).max()), 1e-3)
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        assert out["paper_rule_reject"]["data"] == [r["paper_rule_reject"] for r in v1]


def test_outputs_filter(client: httpx.Client, model: str, images: np.ndarray) -> None:
    body = {"inputs": [bytes_input(images[:1])],
            "outputs": [{"name": "trust"}, {"name": "label"}]}
    resp = client.post(f"/v2/models/{model}/infer", json=body)
    assert resp.status_code == 200, resp.text
    assert [o["name"] for o in resp.json()["outputs"]] == ["trust", "label"]
    body["outputs"] = [{"name": "nonsense"}]
    bad = client.post(f"/v2/models/{model}/infer", json=body)
    assert bad.status_code == 400 and "nonsense" in bad.json()["error"]


@pytest.mark.parametrize(("inp", "status", "mentions"), [
    ({"name": "input", "datatype": "FP32", "shape": [1, 1, 27, 28], "data": [0.5] * 756},
     422, "[N, 1, 28, 28]"),
    ({"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 700},
     422, "784"),
    ({"name": "input", "datatype": "INT64", "shape": [1, 1, 28, 28], "data": [0] * 784},
     422, "FP32"),
    ({"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [2.0] * 784},
     422, "[0, 1]"),
    ({"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": ["x"] * 784},
     422, "numbers"),
    ({"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AAAA"]}, 422, "2"),
    ({"name": "image", "datatype": "BYTES", "shape": [1], "data": ["***"]}, 400, "base64"),
    ({"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}, 400,
     "image"),
    ({"name": "pixels", "datatype": "FP32", "shape": [1], "data": [0.0]}, 400, "pixels"),
])
def test_infer_errors(client: httpx.Client, model: str, inp: dict[str, Any], status: int,
                      mentions: str) -> None:
    resp = client.post(f"/v2/models/{model}/infer", json={"inputs": [inp]})
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body["error"], str) and mentions.lower() in body["error"].lower(), body


def test_infer_protocol_errors(client: httpx.Client, model: str) -> None:
    url = f"/v2/models/{model}/infer"
    bad_json = client.post(url, content=b"{oops", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and isinstance(bad_json.json()["error"], str)
    no_inputs = client.post(url, json={"id": "x"})
    assert no_inputs.status_code == 422 and "inputs" in no_inputs.json()["error"]
    two = client.post(url, json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [0], "data": []}] * 2})
    assert two.status_code == 400 and "exactly one input" in two.json()["error"]


def test_infer_body_over_the_limit_is_413(client: httpx.Client, model: str) -> None:
    big = "A" * (10 * 1024 * 1024 + 16)
    resp = client.post(f"/v2/models/{model}/infer", json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [big]}]})
    assert resp.status_code == 413 and "CONCEPTGUARD_MAX_UPLOAD_BYTES" in resp.json()["error"]


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/json", None])
def test_binary_request_whose_header_fails_validation_is_422(
        client: httpx.Client, model: str, images: np.ndarray, content_type: str | None) -> None:
    """A binary-data request (JSON header + tensor bytes) whose header misses a required
    field is a validation error (422 naming the field), not an unsupported media type."""
    png = encode_png(images[0])
    blob = len(png).to_bytes(4, "little") + png
    header = (b'{"inputs": [{"name": "image", "datatype": "BYTES", '
              b'"parameters": {"binary_data_size": ' + str(len(blob)).encode() + b'}}]}')
    headers = {"Inference-Header-Content-Length": str(len(header))}
    if content_type is not None:
        headers["Content-Type"] = content_type
    resp = client.post(f"/v2/models/{model}/infer", content=header + blob, headers=headers)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert "inputs.0.shape" in error and "required" in error.lower(), error


@pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream"])
def test_binary_tensor_data_with_any_body_type_is_answered(
        client: httpx.Client, model: str, content_type: str) -> None:
    """The binary extension with ``Content-Type: application/json``: the JSON guard checks
    the header's first L bytes only (``Inference-Header-Content-Length``). The tensor here
    is every float32 whose bytes are ``[[[?`` (0.857, a valid pixel value): as JSON it
    would be nested 2,352 levels deep, past the depth limit."""
    x = np.frombuffer(b"[[[?" * 784, dtype="<f4").reshape(1, 1, 28, 28)
    blob = x.tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                     "shape": [1, 1, 28, 28],
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "trust"}]}).encode()
    plain = client.post(f"/v2/models/{model}/infer", json={
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                    "data": x.ravel().tolist()}], "outputs": [{"name": "trust"}]})
    resp = client.post(f"/v2/models/{model}/infer", content=header + blob,
                       headers={"Content-Type": content_type,
                                "Inference-Header-Content-Length": str(len(header))})
    assert resp.status_code == 200 and plain.status_code == 200, resp.text
    assert outputs_by_name(resp.json())["trust"]["data"] == \
        outputs_by_name(plain.json())["trust"]["data"]


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/plain", None])
@pytest.mark.parametrize("binary", [False, True])
def test_the_json_guard_checks_a_v2_body_whatever_its_content_type(
        client: httpx.Client, model: str, content_type: str | None, binary: bool) -> None:
    """A v2 infer body (or its binary-extension header) nested past the depth limit is a
    400 naming the limit with any content type: the guard runs on every v2 body, not only
    on one declared JSON."""
    deep = b'{"inputs": ' + b"[" * 200 + b"]" * 200 + b"}"
    body, headers = deep, {}
    if binary:
        body = deep + b"\x00\x01\x02\x03"
        headers["Inference-Header-Content-Length"] = str(len(deep))
    if content_type is not None:
        headers["Content-Type"] = content_type
    resp = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert resp.status_code == 400, resp.text
    assert "CONCEPTGUARD_MAX_JSON_DEPTH" in resp.json()["error"], resp.text  # v2: a string
