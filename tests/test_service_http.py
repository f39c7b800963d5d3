"""The v1 API over real HTTP against a uvicorn subprocess: classify, parity with the offline
scores, sidecar mode, bank summary and reload, metrics exposition."""

from __future__ import annotations

import asyncio
import base64
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ADMIN_TOKEN, ServerProcess, encode_png, metric_samples, metric_sum

REPO = Path(__file__).resolve().parents[1]

REASON_KINDS = {"accepted", "misclassification-like", "adversarial-like", "unfamiliar"}
RESULT_KEYS = {"label", "class_index", "probabilities", "trust", "reject", "reason", "heads",
               "paper_rule_reject"}


def check_result(r: dict[str, Any], classes: list[str]) -> None:
    assert set(r) >= RESULT_KEYS
    assert r["label"] == classes[r["class_index"]]
    probs = [p["probability"] for p in r["probabilities"]]
    assert len(probs) == min(5, len(classes)) and probs == sorted(probs, reverse=True)
    assert r["probabilities"][0]["label"] == r["label"]
    assert 0.0 <= r["trust"] <= 1.0 and isinstance(r["reject"], bool)
    assert r["reason"]["kind"] in REASON_KINDS
    assert (r["reason"]["kind"] == "accepted") == (not r["reject"])
    assert r["reason"]["summary"].startswith(f"predicted {r['label']}")
    # three concepts, or none where the bank's competence check rules the class out
    unavailable = r["reason"].get("concepts_unavailable")
    assert (len(r["reason"]["concepts"]) == 3 and unavailable is None) or \
        (r["reason"]["concepts"] == [] and r["label"] in unavailable)
    for c in r["reason"]["concepts"]:
        assert set(c) == {"concept", "contribution"}
    assert 0.0 <= r["heads"]["misclassification"] <= 1.0
    assert 0.0 <= r["heads"]["adversarial"] <= 1.0
    assert isinstance(r["paper_rule_reject"], bool)


def test_health_docs_and_openapi(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/classify", "/v1/monitor", "/v1/bank", "/v1/bank/reload", "/metrics",
              "/v2/models/{name}/infer"):
        assert p in paths


def test_classify_one_image_multipart(client: httpx.Client, sample_png: bytes,
                                      demo_manifest: dict[str, Any]) -> None:
    resp = client.post("/v1/classify", files={"file": ("x.png", sample_png, "image/png")})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    check_result(body, demo_manifest["classes"])
    assert body["bank"] == {"id": demo_manifest["bank_id"], "name": demo_manifest["name"],
                            "schema_version": demo_manifest["schema_version"]}
    assert body["latency_ms"] > 0


def test_batch_forms_agree_with_single(client: httpx.Client, fashion_mnist_test: Any,
                                       demo_manifest: dict[str, Any]) -> None:
    pngs = [encode_png(fashion_mnist_test.images[i]) for i in range(3)]
    singles = [client.post("/v1/classify", files={"file": ("a.png", p, "image/png")}).json()
               for p in pngs]
    as_json = client.post("/v1/classify", json={
        "images": [base64.b64encode(p).decode() for p in pngs]}).json()
    as_files = client.post("/v1/classify", files=[("files", (f"{i}.png", p, "image/png"))
                                                  for i, p in enumerate(pngs)]).json()
    raw = client.post("/v1/classify", content=pngs[0],
                      headers={"content-type": "image/png"}).json()
    one_json = client.post("/v1/classify",
                           json={"image": base64.b64encode(pngs[0]).decode()}).json()
    for batch in (as_json, as_files):
        assert len(batch["results"]) == 3 and batch["bank"]["id"] == demo_manifest["bank_id"]
        for single, row in zip(singles, batch["results"], strict=True):
            check_result(row, demo_manifest["classes"])
            assert row["class_index"] == single["class_index"]
            assert row["trust"] == pytest.approx(single["trust"], abs=1e-6)
    for one in (raw, one_json):
        assert one["trust"] == pytest.approx(singles[0]["trust"], abs=1e-6)


async def _classify_all(url: str, pngs: list[bytes]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as ac:
        resps = await asyncio.gather(*(
            ac.post("/v1/classify", files={"file": ("t.png", p, "image/png")}) for p in pngs))
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps][:3]
    return [r.json() for r in resps]


def test_trust_matches_the_offline_scores(server: ServerProcess, fashion_mnist_test: Any,
                                          test_scores_sample: dict[str, Any]) -> None:
    """The service and the offline evaluation score the same images identically (the demo
    bank is served through its fused graph: the scores come out of ONNX Runtime)."""
    assert httpx.get(f"{server.url}/v1/bank").json()["runtime"]["graph"] == "fused"
    idx = test_scores_sample["test_indices"]
    pngs = [encode_png(fashion_mnist_test.images[i]) for i in idx]
    results = asyncio.run(_classify_all(server.url, pngs))  # concurrent: batched
    assert [r["class_index"] for r in results] == test_scores_sample["predictions"]
    trust = np.array([r["trust"] for r in results])
    np.testing.assert_allclose(trust, test_scores_sample["trust"], rtol=0, atol=1e-5)
    for key, head in (("p_misclassification", "misclassification"),
                      ("p_anomaly", "anomaly"), ("p_adversarial", "adversarial"),
                      ("p_unfamiliar", "unfamiliar")):
        got = np.array([r["heads"][head] for r in results])
        np.testing.assert_allclose(got, test_scores_sample[key], rtol=0, atol=1e-5)
    assert [r["reject"] for r in results] == test_scores_sample["reject"]
    assert [r["reason"]["kind"] for r in results] == test_scores_sample["reason"]


def onnx_outputs(onnx_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and features of uint8 NHWC images from the bank's serving graph, with ONNX
    Runtime directly (as a client running the classifier itself would)."""
    import onnxruntime as ort

    from conceptguard.imaging import to_model_input

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: to_model_input(images)}
    logits, features = session.run(["logits", "features"], feed)
    return logits, features


# The sidecar projects features to concept scores in float64 (conceptguard.projection.
# project_features); the served ONNX graph does it in float32. The standardisation divides
# by small per-concept spreads, so the two differ by up to ~1e-3 in s^ and in trust on
# a weak aligner (the demo bank); predictions and decisions agree.
SIDECAR_TRUST_ATOL = 5e-3


def test_sidecar_monitor_matches_classify(client: httpx.Client, demo_bank_dir: Path,
                                          fashion_mnist_test: Any,
                                          demo_manifest: dict[str, Any]) -> None:
    images = fashion_mnist_test.images[10:14]
    logits, features = onnx_outputs(demo_bank_dir / "classifier.onnx", images)
    classified = client.post("/v1/classify", files=[
        ("files", (f"{i}.png", encode_png(im), "image/png")) for i, im in enumerate(images)]
    ).json()["results"]
    with_logits = client.post("/v1/monitor", json={"features": features.tolist(),
                                                   "logits": logits.tolist()})
    assert with_logits.status_code == 200, with_logits.text
    without_logits = client.post("/v1/monitor", json={"features": features.tolist()})
    assert without_logits.status_code == 200, without_logits.text
    threshold = demo_manifest["threshold"]["value"]
    for rows in (with_logits.json()["results"], without_logits.json()["results"]):
        assert len(rows) == 4
        for row, ref in zip(rows, classified, strict=True):
            assert row["class_index"] == ref["class_index"]
            assert row["trust"] == pytest.approx(ref["trust"], abs=SIDECAR_TRUST_ATOL)
            if abs(ref["trust"] - threshold) > SIDECAR_TRUST_ATOL:
                assert row["reject"] == ref["reject"]
            assert row["probabilities"][0]["probability"] == pytest.approx(
                ref["probabilities"][0]["probability"], abs=1e-5)


def test_bank_summary(client: httpx.Client, demo_manifest: dict[str, Any]) -> None:
    body = client.get("/v1/bank").json()
    assert body["id"] == demo_manifest["bank_id"]
    assert body["classes"] == demo_manifest["classes"]
    assert body["concepts"] == [c["name"] for c in demo_manifest["concepts"]]
    assert body["classifier"]["hash"] == demo_manifest["classifier"]["hash"]
    assert body["vlm"]["id"] == demo_manifest["vlm"]["id"]
    assert "zero_shot_accuracy" in body["vlm"]
    assert body["threshold"]["value"] == demo_manifest["threshold"]["value"]
    assert body["runtime"]["backend"] == "onnx"
    assert isinstance(body["evaluation"], dict)


def _reload(client: httpx.Client, path: str | None = None,
            token: str | None = ADMIN_TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    body = {"path": str(path)} if path is not None else None
    return client.post("/v1/bank/reload", json=body, headers=headers, timeout=120.0)


def test_reload_requires_the_admin_token(client: httpx.Client) -> None:
    missing = _reload(client, token=None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    wrong = _reload(client, token="not-the-token")
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"


def test_reload_refuses_a_corrupt_bank_and_keeps_serving(
        client: httpx.Client, demo_bank_dir: Path, banks_root: Path, sample_png: bytes) -> None:
    before = client.get("/v1/bank").json()["id"]
    broken = banks_root / "broken"
    shutil.copytree(demo_bank_dir, broken)
    tensors = broken / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    for pos in range(len(data) // 2, len(data) // 2 + 16):
        data[pos] ^= 0xFF
    tensors.write_bytes(bytes(data))
    resp = _reload(client, "broken")
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "invalid_bank" and "tensors.safetensors" in err["message"]
    assert client.get("/v1/bank").json()["id"] == before
    ok = client.post("/v1/classify", files={"file": ("x.png", sample_png, "image/png")})
    assert ok.status_code == 200 and ok.json()["bank"]["id"] == before
    missing = _reload(client, "nowhere")
    assert missing.status_code == 422 and "does not exist" in missing.json()["error"]["message"]
    assert str(banks_root) not in resp.text + missing.text  # names relative to the root


def test_reload_swaps_to_a_valid_copy(client: httpx.Client, demo_bank_dir: Path,
                                      banks_root: Path, sample_png: bytes) -> None:
    copy = banks_root / "copy"
    shutil.copytree(demo_bank_dir, copy)
    before = client.get("/v1/bank").json()
    try:
        resp = _reload(client, "copy")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["status"] == "reloaded" and body["bank"]["id"] == before["id"]
        assert body["previous"]["id"] == before["id"]
        after = client.get("/v1/bank").json()
        assert after["id"] == before["id"] and after["path"] == "copy"
        ok = client.post("/v1/classify", files={"file": ("x.png", sample_png, "image/png")})
        assert ok.status_code == 200 and ok.json()["bank"]["id"] == before["id"]
    finally:
        back = _reload(client, "demo")
        assert back.status_code == 200, back.text
    metrics = client.get("/metrics").text
    assert metric_sum(metrics, "conceptguard_bank_reloads_total", result="success") >= 2
    assert metric_sum(metrics, "conceptguard_bank_info", bank_id=before["id"]) >= 1


def test_metrics_exposition(client: httpx.Client, sample_png: bytes,
                            demo_manifest: dict[str, Any]) -> None:
    def scrape() -> str:
        return client.get("/metrics").text

    before = scrape()
    resp = client.post("/v1/classify", files={"file": ("x.png", sample_png, "image/png")})
    decision = "reject" if resp.json()["reject"] else "accept"
    label = resp.json()["label"]
    after = scrape()
    model = demo_manifest["name"]

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("conceptguard_requests_total", endpoint="/v1/classify", status="200") == 1
    assert delta("conceptguard_predictions_total", model=model, decision=decision,
                 **{"class": label}) == 1
    assert delta("conceptguard_trust_score_count", model=model) == 1
    assert delta("conceptguard_head_score_count", model=model, head="adversarial") == 1
    assert delta("conceptguard_head_score_count", model=model, head="unfamiliar") == 1
    assert delta("conceptguard_head_score_count", model=model, head="anomaly") == 1
    assert delta("conceptguard_request_duration_seconds_count", endpoint="/v1/classify") == 1
    assert delta("conceptguard_batch_size_count") == 1
    assert delta("conceptguard_queue_wait_seconds_count") == 1
    assert delta("conceptguard_inference_duration_seconds_count") == 1
    n_concepts = len(demo_manifest["concepts"])
    assert delta("conceptguard_concept_score_count", model=model) == n_concepts
    for name in ("conceptguard_queue_depth", "conceptguard_queue_full_total",
                 "conceptguard_concept_score_mean", "conceptguard_bank_info",
                 "conceptguard_paper_rule_rejections_total", "conceptguard_rejections_total"):
        assert name in after, name
    # random pixels: a foreign input, rejected as unfamiliar and counted under that label
    noise = (REPO / "examples" / "noise.png").read_bytes()
    r = client.post("/v1/classify", files={"file": ("n.png", noise, "image/png")}).json()
    assert r["reject"] and r["reason"]["kind"] == "unfamiliar"
    last = scrape()
    assert (metric_sum(last, "conceptguard_rejections_total", model=model, reason="unfamiliar")
            - metric_sum(after, "conceptguard_rejections_total", model=model,
                         reason="unfamiliar")) == 1
    info = [lab for lab, v in metric_samples(after, "conceptguard_bank_info") if v == 1]
    assert info and info[0]["bank_id"] == demo_manifest["bank_id"]
    assert set(info[0]) >= {"model", "bank_id", "vlm", "classifier_hash", "schema_version"}


def test_a_failed_request_counts_none_of_its_images(client: httpx.Client, sample_png: bytes,
                                                    demo_manifest: dict[str, Any]) -> None:
    """Three good images and a truncated one in one request: the request fails (400) and
    the bank's series count none of the four (the client got no answer for any); the same
    good images in a request that succeeds count three."""
    model = demo_manifest["name"]
    broken = sample_png[: len(sample_png) // 2]

    def scored() -> float:
        return metric_sum(client.get("/metrics").text, "conceptguard_predictions_total",
                          model=model)

    before = scored()
    files = [("files", (f"{i}.png", sample_png, "image/png")) for i in range(3)]
    r = client.post("/v1/classify", files=[*files, ("files", ("bad.png", broken,
                                                               "image/png"))])
    assert r.status_code == 400
    assert scored() == before
    assert client.post("/v1/classify", files=files).status_code == 200
    assert scored() == before + 3
