"""The fused graph (``monitor.onnx``) in the service: the demo bank is served through it
(one runtime call per batch gives every score), a bank without it is still served through
numpy ``score()`` with the same responses, a stale one is refused, and
``conceptguard export-graph`` adds it to an older bank."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ADMIN_TOKEN, encode_png

TOL = 1e-5  # float32 graph vs float64 score(), as tests/test_monitor_graph.py


def _reload(client: httpx.Client, path: str) -> httpx.Response:
    return client.post("/v1/bank/reload", json={"path": path}, timeout=120.0,
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


def _without_fused_graph(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as banks were written before the fused graph."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    (dst / "monitor.onnx").unlink()
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["files"]["monitor.onnx"]
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def _classify(client: httpx.Client, pngs: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for png in pngs:
        resp = client.post("/v1/classify", files={"file": ("x.png", png, "image/png")})
        assert resp.status_code == 200, resp.text
        out.append(resp.json())
    return out


def _assert_same_response(fused: dict[str, Any], numpy: dict[str, Any]) -> None:
    """Same fields everywhere, same decisions, numbers within TOL."""
    assert set(fused) == set(numpy)
    assert set(fused["heads"]) == set(numpy["heads"])
    assert set(fused["reason"]) == set(numpy["reason"])
    for key in ("label", "class_index", "reject", "paper_rule_reject"):
        assert fused[key] == numpy[key], key
    assert fused["reason"]["kind"] == numpy["reason"]["kind"]
    assert fused["trust"] == pytest.approx(numpy["trust"], abs=TOL)
    for head, value in numpy["heads"].items():
        assert fused["heads"][head] == pytest.approx(value, abs=TOL), head
    assert [p["label"] for p in fused["probabilities"]] == \
        [p["label"] for p in numpy["probabilities"]]
    np.testing.assert_allclose([p["probability"] for p in fused["probabilities"]],
                               [p["probability"] for p in numpy["probabilities"]], atol=TOL)
    assert [c["concept"] for c in fused["reason"]["concepts"]] == \
        [c["concept"] for c in numpy["reason"]["concepts"]]
    np.testing.assert_allclose([c["contribution"] for c in fused["reason"]["concepts"]],
                               [c["contribution"] for c in numpy["reason"]["concepts"]],
                               atol=TOL)


def test_fused_graph_is_served_and_a_bank_without_it_falls_back_to_numpy(
        client: httpx.Client, demo_bank_dir: Path, banks_root: Path, fashion_mnist_test: Any,
        test_scores_sample: dict[str, Any]) -> None:
    assert client.get("/v1/bank").json()["runtime"]["graph"] == "fused"
    pngs = [encode_png(fashion_mnist_test.images[i])
            for i in test_scores_sample["test_indices"][:12]]
    fused = _classify(client, pngs)
    _without_fused_graph(demo_bank_dir, banks_root / "no-fused-graph")
    try:
        resp = _reload(client, "no-fused-graph")
        assert resp.status_code == 200, resp.text
        assert client.get("/v1/bank").json()["runtime"]["graph"] == "classifier"
        numpy = _classify(client, pngs)
    finally:
        back = _reload(client, "demo")
        assert back.status_code == 200, back.text
    assert client.get("/v1/bank").json()["runtime"]["graph"] == "fused"
    for f, n in zip(fused, numpy, strict=True):
        _assert_same_response(f, n)
    assert [r["trust"] for r in numpy] == pytest.approx(test_scores_sample["trust"][:12],
                                                        abs=TOL)


def test_reload_refuses_a_fused_graph_exported_from_other_tensors(
        client: httpx.Client, demo_bank_dir: Path, banks_root: Path) -> None:
    from safetensors.numpy import load_file, save_file

    stale = banks_root / "stale-fused-graph"
    if stale.exists():
        shutil.rmtree(stale)
    shutil.copytree(demo_bank_dir, stale)
    tensors = load_file(str(stale / "tensors.safetensors"))
    tensors["trust.misclassification.b"] = tensors["trust.misclassification.b"] + 2.0
    save_file(tensors, str(stale / "tensors.safetensors"))
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["files"]["tensors.safetensors"] = hashlib.sha256(
        (stale / "tensors.safetensors").read_bytes()).hexdigest()
    (stale / "manifest.json").write_text(json.dumps(manifest))
    before = client.get("/v1/bank").json()
    resp = _reload(client, "stale-fused-graph")
    assert resp.status_code == 422, resp.text
    message = resp.json()["error"]["message"]
    assert "monitor.onnx" in message and "export-graph" in message
    after = client.get("/v1/bank").json()
    assert (after["id"], after["path"]) == (before["id"], before["path"])


def test_bank_checks_the_fused_graph_only_when_listed(demo_bank_dir: Path,
                                                      tmp_path: Path) -> None:
    from conceptguard.bank import BankError, load_bank

    assert load_bank(demo_bank_dir).fused_onnx_path == demo_bank_dir / "monitor.onnx"
    old = _without_fused_graph(demo_bank_dir, tmp_path / "old")
    assert load_bank(old).fused_onnx_path is None
    (old / "monitor.onnx").write_bytes(b"not listed: not used, not checked")
    assert load_bank(old).fused_onnx_path is None
    corrupt = tmp_path / "corrupt"
    shutil.copytree(demo_bank_dir, corrupt)
    (corrupt / "monitor.onnx").write_bytes(b"replaced")
    with pytest.raises(BankError, match=r"monitor\.onnx is corrupt"):
        load_bank(corrupt)
    (corrupt / "monitor.onnx").unlink()
    with pytest.raises(BankError, match=r"monitor\.onnx is missing"):
        load_bank(corrupt)


def test_export_graph_adds_the_fused_graph_to_an_older_bank(demo_bank_dir: Path,
                                                            tmp_path: Path) -> None:
    from conceptguard.bank import load_bank
    from offline.cli import main

    old = _without_fused_graph(demo_bank_dir, tmp_path / "bank")
    before = json.loads((old / "manifest.json").read_text())
    assert main(["export-graph", str(old)]) == 0
    after = json.loads((old / "manifest.json").read_text())
    assert set(after["files"]) == set(before["files"]) | {"monitor.onnx"}
    assert after.pop("fused_graph") == {"written": True}
    before.pop("fused_graph", None)
    assert {k: v for k, v in after.items() if k != "files"} == \
        {k: v for k, v in before.items() if k != "files"}
    bank = load_bank(old)
    assert bank.fused_onnx_path == old / "monitor.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no staging left behind


def test_torch_backend_serves_classifier_and_monitor_as_one_module(
        client: httpx.Client, server_factory: Any, fashion_mnist_test: Any,
        test_scores_sample: dict[str, Any]) -> None:
    """``CONCEPTGUARD_BACKEND=torch`` on a bank with a fused graph runs the monitor inside
    the torch module (``/v1/bank`` says ``graph: fused``; tests/test_monitor_graph.py checks
    the module's outputs), and answers as the ONNX Runtime server does on the same images."""
    pngs = [encode_png(fashion_mnist_test.images[i])
            for i in test_scores_sample["test_indices"][:12]]
    onnx = _classify(client, pngs)
    torch_server = server_factory(settings={"backend": "torch", "device": "cpu"})
    with httpx.Client(base_url=torch_server.url, timeout=30.0) as torch_client:
        runtime = torch_client.get("/v1/bank").json()["runtime"]
        assert (runtime["backend"], runtime["graph"], runtime["provider"]) == \
            ("torch", "fused", "torch-cpu")
        served = _classify(torch_client, pngs)
    for t, o in zip(served, onnx, strict=True):
        _assert_same_response(t, o)
