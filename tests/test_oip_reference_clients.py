"""The Open Inference Protocol driven by its reference Python clients, unchanged
(``tritonclient.http`` and ``tritonclient.grpc``) against a real server process: REST with
the binary tensor data extension on and off, gRPC with raw contents, BYTES (raw PNG files)
and FP32 inputs; every answer equals ``/v1/classify``'s for the same images.

The test process never imports ``service.proto`` (its messages share the ``inference``
package names with tritonclient's, and one protobuf pool cannot hold both)."""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from tests.conftest import ServerProcess, encode_png

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.tolerance import assert_f32_close  # noqa: E402

OUTPUTS = ("probabilities", "label", "class_index", "trust", "reject", "p_misclassification",
           "p_anomaly", "p_adversarial", "p_unfamiliar", "reason_kind", "reason_concepts",
           "reason_contributions", "paper_rule_reject")


@pytest.fixture(scope="module")
def model(demo_manifest: dict[str, Any]) -> str:
    return demo_manifest["name"]


@pytest.fixture(scope="module")
def images(fashion_mnist_test: Any) -> np.ndarray:
    return fashion_mnist_test.images[:4]


@pytest.fixture(scope="module")
def v1(client: httpx.Client, images: np.ndarray) -> dict[str, np.ndarray]:
    files = [("files", (f"{i}.png", encode_png(im), "image/png")) for i, im in enumerate(images)]
    res = client.post("/v1/classify", files=files).json()["results"]
    return {"label": np.array([r["label"].encode() for r in res], dtype=object),
            "class_index": np.array([r["class_index"] for r in res]),
            "reject": np.array([r["reject"] for r in res]),
            "trust": np.array([r["trust"] for r in res]),
            "p_misclassification": np.array([r["heads"]["misclassification"] for r in res]),
            "p_anomaly": np.array([r["heads"]["anomaly"] for r in res]),
            "p_adversarial": np.array([r["heads"]["adversarial"] for r in res]),
            "p_unfamiliar": np.array([r["heads"]["unfamiliar"] for r in res]),
            "reason_kind": [r["reason"]["kind"] for r in res],
            "reason_concepts": [[c["concept"] for c in r["reason"]["concepts"]] for r in res],
            "reason_contributions": np.array([[c["contribution"] for c in r["reason"]["concepts"]]
                                              for r in res]),
            "paper_rule_reject": [r["paper_rule_reject"] for r in res]}


@pytest.fixture(scope="module")
def http_client(server: ServerProcess) -> Any:
    c = tritonhttp.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_client(server: ServerProcess) -> Any:
    c = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield c
    c.close()


def png_array(images: np.ndarray) -> np.ndarray:
    return np.array([encode_png(im) for im in images], dtype=object)


def fp32_array(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def assert_matches_v1(result: Any, v1: dict[str, np.ndarray], n: int, k: int) -> None:
    probs = result.as_numpy("probabilities")
    assert probs.shape == (n, k) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    labels = [b if isinstance(b, bytes) else str(b).encode() for b in result.as_numpy("label")]
    assert labels == list(v1["label"])  # JSON BYTES come back as str, binary as bytes
    assert result.as_numpy("class_index").tolist() == v1["class_index"].tolist()
    assert np.argmax(probs, 1).tolist() == v1["class_index"].tolist()
    assert result.as_numpy("reject").astype(bool).tolist() == v1["reject"].tolist()
    for name in ("trust", "p_misclassification", "p_anomaly", "p_adversarial",
                 "p_unfamiliar"):
        assert_f32_close(result.as_numpy(name), v1[name], terms=1, err_msg=name)

    def text(values: np.ndarray) -> list[Any]:
        return np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else str(b),
                            otypes=[object])(values).tolist()

    # the "why" travels too: v1's reason kind, concepts and contributions, the paper's rule
    assert text(result.as_numpy("reason_kind")) == v1["reason_kind"]
    assert text(result.as_numpy("reason_concepts")) == v1["reason_concepts"]
    contributions = result.as_numpy("reason_contributions")
    assert contributions.dtype == np.float32
    scale = float(np.abs(v1["reason_contributions"]).max())
    np.testing.assert_allclose(contributions, v1["reason_contributions"], rtol=0,
                               atol=8 * np.finfo(np.float32).eps * max(scale, 1e-3))
    assert result.as_numpy("paper_rule_reject").astype(bool).tolist() == v1["paper_rule_reject"]


# ---------------------------------------------------------------- REST (tritonclient.http)


def test_http_client_health_and_metadata(http_client: Any, model: str,
                                         demo_manifest: dict[str, Any]) -> None:
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert http_client.is_model_ready(model)
    meta = http_client.get_server_metadata()
    assert {"binary_tensor_data", "statistics"} <= set(meta["extensions"])
    assert http_client.get_model_metadata(model)["versions"] == [demo_manifest["bank_id"]]


@pytest.mark.parametrize("kind", ["png", "fp32"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_client_infer_equals_v1(http_client: Any, model: str, images: np.ndarray,
                                     v1: dict[str, np.ndarray], demo_manifest: dict[str, Any],
                                     kind: str, binary: bool) -> None:
    if kind == "png":
        inp = tritonhttp.InferInput("image", [len(images)], "BYTES")
        data = png_array(images)
        if not binary:  # JSON BYTES elements are strings: base64 of the files
            data = np.array([base64.b64encode(b) for b in data], dtype=object)
        inp.set_data_from_numpy(data, binary_data=binary)
    else:
        x = fp32_array(images)
        inp = tritonhttp.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [tritonhttp.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    result = http_client.infer(model, [inp], outputs=outputs, request_id="r1")
    assert result.get_response()["id"] == "r1"
    assert_matches_v1(result, v1, len(images), demo_manifest["dims"]["classes"])


def test_http_client_default_request_gets_binary_outputs(
        server: ServerProcess, http_client: Any, model: str, images: np.ndarray,
        v1: dict[str, np.ndarray], demo_manifest: dict[str, Any]) -> None:
    """No outputs named: the client asks for binary_data_output, all outputs come back
    as binary data (the reference client's defaults, nothing set)."""
    inp = tritonhttp.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(png_array(images))
    result = http_client.infer(model, [inp])
    outs = result.get_response()["outputs"]
    assert [o["name"] for o in outs] == list(OUTPUTS)
    assert all("binary_data_size" in o["parameters"] and "data" not in o for o in outs)
    assert_matches_v1(result, v1, len(images), demo_manifest["dims"]["classes"])


def test_http_client_errors_are_exceptions(http_client: Any, model: str) -> None:
    inp = tritonhttp.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException, match="image"):
        http_client.infer(model, [inp])
    with pytest.raises(InferenceServerException, match="unknown model"):
        http_client.infer("no-such-model", [inp])


def test_raw_http_no_content_type_and_binary_body(client: httpx.Client, model: str,
                                                  images: np.ndarray,
                                                  v1: dict[str, np.ndarray]) -> None:
    """What the client does on the wire, by hand: JSON without Content-Type; a binary
    body whose BYTES input is the PNG file itself, length-prefixed."""
    url = f"/v2/models/{model}/infer"
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(encode_png(images[0])).decode()]}],
            "outputs": [{"name": "label"}]}
    resp = client.post(url, content=json.dumps(body).encode())
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"] == [v1["label"][0].decode()]

    png = encode_png(images[0])
    blob = len(png).to_bytes(4, "little") + png
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "class_index",
                                      "parameters": {"binary_data": True}},
                                     {"name": "label"}]}).encode()
    resp = client.post(url, content=header + blob,
                       headers={"Inference-Header-Content-Length": str(len(header)),
                                "Content-Type": "application/octet-stream"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/octet-stream"
    n = int(resp.headers["inference-header-content-length"])
    head = json.loads(resp.content[:n])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert head["outputs"][1]["data"] == [v1["label"][0].decode()]
    assert int.from_bytes(resp.content[n:], "little") == int(v1["class_index"][0])

    for bad_headers, bad_body, status in [
            ({"Inference-Header-Content-Length": "999999"}, header + blob, 400),
            ({"Inference-Header-Content-Length": str(len(header))}, header + blob + b"x", 400),
            ({"Inference-Header-Content-Length": str(len(header))}, header + blob[:-3], 400)]:
        bad = client.post(url, content=bad_body, headers=bad_headers)
        assert bad.status_code == status and isinstance(bad.json()["error"], str), bad.text


def test_model_statistics(client: httpx.Client, model: str, sample_png: bytes) -> None:
    before = client.get(f"/v2/models/{model}/stats").json()["model_stats"][0]
    resp = client.post(f"/v2/models/{model}/infer", json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1],
         "data": [base64.b64encode(sample_png).decode()]}]})
    assert resp.status_code == 200
    after = client.get(f"/v2/models/{model}/stats").json()["model_stats"][0]
    assert after["name"] == model
    assert after["inference_count"] >= before["inference_count"] + 1
    success = after["inference_stats"]["success"]
    assert success["count"] >= before["inference_stats"]["success"]["count"] + 1
    assert success["ns"] > 0
    assert client.get("/v2/models/stats").json()["model_stats"][0]["name"] == model


# ---------------------------------------------------------------- gRPC (tritonclient.grpc)


def test_grpc_client_health_and_metadata(grpc_client: Any, server: ServerProcess, model: str,
                                         demo_manifest: dict[str, Any]) -> None:
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert grpc_client.is_model_ready(model)
    meta = grpc_client.get_server_metadata(as_json=True)
    assert meta["name"] == "conceptguard" and "binary_tensor_data" in meta["extensions"]
    mm = grpc_client.get_model_metadata(model, as_json=True)
    assert mm["versions"] == [demo_manifest["bank_id"]]
    assert {i["name"]: i["datatype"] for i in mm["inputs"]} == {"image": "BYTES",
                                                                "input": "FP32"}
    # the standard gRPC health service
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("kind", ["png", "fp32"])
def test_grpc_client_infer_raw_contents_equals_v1(grpc_client: Any, model: str,
                                                  images: np.ndarray,
                                                  v1: dict[str, np.ndarray],
                                                  demo_manifest: dict[str, Any],
                                                  kind: str) -> None:
    if kind == "png":
        inp = tritongrpc.InferInput("image", [len(images)], "BYTES")
        inp.set_data_from_numpy(png_array(images))
    else:
        x = fp32_array(images)
        inp = tritongrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
    result = grpc_client.infer(model, [inp], request_id="g1")
    response = result.get_response()
    assert response.id == "g1" and len(response.raw_output_contents) == len(OUTPUTS)
    assert_matches_v1(result, v1, len(images), demo_manifest["dims"]["classes"])
    some = grpc_client.infer(model, [inp], outputs=[tritongrpc.InferRequestedOutput("trust")])
    assert [o.name for o in some.get_response().outputs] == ["trust"]


def test_grpc_errors_carry_status_codes(grpc_client: Any, model: str) -> None:
    inp = tritongrpc.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException) as bad:
        grpc_client.infer(model, [inp])
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as missing:
        grpc_client.infer("no-such-model", [inp])
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    x = np.zeros((1, 1, 27, 28), np.float32)
    wrong = tritongrpc.InferInput("input", list(x.shape), "FP32")
    wrong.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match=r"\[N, 1, 28, 28\]"):
        grpc_client.infer(model, [wrong])


def test_grpc_goes_through_the_same_batcher_and_metrics(grpc_client: Any, client: httpx.Client,
                                                        model: str, images: np.ndarray) -> None:
    from tests.conftest import metric_sum

    before = client.get("/metrics").text
    inp = tritongrpc.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(png_array(images))
    grpc_client.infer(model, [inp])
    after = client.get("/metrics").text
    endpoint = "/inference.GRPCInferenceService/ModelInfer"
    assert (metric_sum(after, "conceptguard_requests_total", endpoint=endpoint, status="200")
            >= metric_sum(before, "conceptguard_requests_total", endpoint=endpoint,
                          status="200") + 1)
    # the images went through the batcher (one histogram for every transport) and scoring
    assert (metric_sum(after, "conceptguard_batch_size_sum")
            >= metric_sum(before, "conceptguard_batch_size_sum") + len(images))
    assert (metric_sum(after, "conceptguard_predictions_total", model=model)
            >= metric_sum(before, "conceptguard_predictions_total", model=model) + len(images))


def test_grpc_on_every_worker_of_a_multiworker_server(server_factory: Any, tmp_path: Any,
                                                      model: str, images: np.ndarray) -> None:
    """Two uvicorn workers, one gRPC port (SO_REUSEPORT): every new connection is served.
    (Its own server: the session's multiworker server counts its requests exactly.)"""
    mp = tmp_path / "prometheus"
    mp.mkdir()
    srv = server_factory(workers=2, use_cli=True,
                         extra_env={"PROMETHEUS_MULTIPROC_DIR": str(mp)})
    # ready over HTTP means one worker is; the other may still be loading its bank and
    # answer UNAVAILABLE "still loading" (retry shortly), as it should: wait for it
    deadline = time.monotonic() + 60
    for _ in range(4):
        while True:
            c = tritongrpc.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
            try:
                inp = tritongrpc.InferInput("image", [1], "BYTES")
                inp.set_data_from_numpy(png_array(images[:1]))
                assert c.infer(model, [inp]).as_numpy("label").shape == (1,)
                break
            except InferenceServerException as exc:
                if "still loading" not in str(exc) or time.monotonic() > deadline:
                    raise
            finally:
                c.close()
            time.sleep(0.2)


def test_grpc_port_taken_stops_the_startup(tmp_path: Any) -> None:
    import socket

    from tests.conftest import launch_server

    with socket.socket() as taken:  # no SO_REUSEPORT: gRPC cannot share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = launch_server(tmp_path, settings={"grpc_port": port, "grpc_host": "127.0.0.1"})
        try:
            srv.process.wait(timeout=60)
        finally:
            srv.stop()
    assert srv.process.returncode != 0
    assert "CONCEPTGUARD_GRPC_PORT" in srv.log_tail()


def test_grpc_calls_past_their_deadline_are_499_not_500(
        grpc_client: Any, client: httpx.Client, model: str) -> None:
    """A call cancelled by its deadline while the server decodes it is counted 499
    (``client_closed``), not as a server error."""
    from PIL import Image

    from tests.conftest import metric_sum

    endpoint = "/inference.GRPCInferenceService/ModelInfer"

    def count(text: str, status: str) -> float:
        return metric_sum(text, "conceptguard_requests_total", endpoint=endpoint,
                          status=status)

    noise = np.random.default_rng(0).integers(0, 256, (1500, 1500), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG", compress_level=1)
    inp = tritongrpc.InferInput("image", [3], "BYTES")
    inp.set_data_from_numpy(np.array([buf.getvalue()] * 3, dtype=object))
    before = client.get("/metrics").text
    late = 0
    for timeout_s in (0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2):  # three decodes outlive some
        try:
            grpc_client.infer(model, [inp], client_timeout=timeout_s)
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.DEADLINE_EXCEEDED", exc
            late += 1
    assert late
    deadline = time.monotonic() + 15
    while True:  # the server records a call once its handler has unwound
        after = client.get("/metrics").text
        if count(after, "499") >= count(before, "499") + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert count(after, "499") >= count(before, "499") + 1
    assert count(after, "500") == count(before, "500")
