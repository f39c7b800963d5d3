"""A detector without a fused form: build-bank falls back to the classifier graph plus numpy
scoring, logs why and records it in the manifest; the served scores equal the offline numpy
path's.

The fake detector (``ConceptNorm``: ``-|s|``, a statistic with no ``fused()``) is registered
for the fused-graph stage alone on the demo bank's stored tensors (fast), and for one
in-process build over the session's tiny bank config (slow: its classifier and per-image
cache are reused; the trust model is fitted with the extra column)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from conceptguard.bank import load_bank
from conceptguard.classifier.inference import to_tensor
from conceptguard.detectors import DETECTORS, Detector, Outputs
from conceptguard.monitor_graph import MonitorGraph, NotFusable, fusable
from conceptguard.scoring import score
from conceptguard.trust import feature_names
from offline.config import load_config
from offline.pipeline import SAMPLE_FILE, build_bank
from service.bank_loader import open_bank
from service.settings import Settings
from tests.fixtures_bank import REPO, TinyBuild
from tests.tolerance import assert_f32_close, f32_tolerance


class ConceptNorm(Detector):
    """``-|s|``: the norm of the standardised concept scores, negated; no fused form."""

    name, group, summary = "test_concept_norm", "statistic", "concept norm (test only)"

    def risk(self, out: Outputs) -> np.ndarray:
        return -np.linalg.norm(np.asarray(out.concepts, np.float64), axis=1)


def test_fused_graph_stage_falls_back_and_says_why(
        demo_bank_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The stage on a state holding only what it reads before the fallback: the stored
    tensors (the fake detector has no state) and the threshold. Nothing is written."""
    from types import SimpleNamespace

    from safetensors.numpy import load_file

    from offline.pipeline import BuildState, Context, fused_graph_stage

    threshold = load_bank(demo_bank_path).monitor.threshold  # loads with the real registry
    monkeypatch.setitem(DETECTORS, ConceptNorm.name, ConceptNorm)
    state = BuildState()
    state.tensors = load_file(str(demo_bank_path / "tensors.safetensors"))
    state.calibration = SimpleNamespace(  # type: ignore[assignment]
        monitor=SimpleNamespace(threshold=threshold))
    state.classifier = SimpleNamespace()  # type: ignore[assignment]  # unread on fallback
    ctx = Context(load_config(REPO / "configs" / "fashion-mnist-demo.yaml"), None,
                  progress=False, staging=tmp_path)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="conceptguard.build"):
        out = fused_graph_stage(ctx, state)
    assert out.path is None and "'test_concept_norm' (ConceptNorm)" in (out.fallback or "")
    assert out.manifest_entry() == {"written": False,
                                    "fallback": "classifier.onnx + numpy scoring",
                                    "reason": out.fallback}
    assert [r.getMessage() for r in caplog.records] == [
        f"no fused graph: {out.fallback}; the bank serves classifier.onnx with numpy scoring"]
    assert list(tmp_path.iterdir()) == []


def test_a_fused_graph_that_disagrees_falls_back_too(
        demo_bank_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A graph written but off from numpy score() beyond its tolerance (float32 that cannot
    carry a degenerate classifier's arithmetic): removed, and the bank falls back with the
    check's finding as the reason, instead of the build failing."""
    from types import SimpleNamespace

    from safetensors.numpy import load_file

    import offline.pipeline as pipeline
    from conceptguard.monitor_graph import GraphDisagrees

    def write(model, monitor, shape, path: Path) -> None:
        path.write_bytes(b"graph")

    def disagree(monitor, path: Path, images) -> None:
        raise GraphDisagrees(path, "p_anomaly differs by 0.0004 (tolerance 0.00035)")

    monkeypatch.setattr(pipeline, "export_fused_onnx", write)
    monkeypatch.setattr(pipeline, "check_fused_graph", disagree)
    state = pipeline.BuildState()
    state.tensors = load_file(str(demo_bank_path / "tensors.safetensors"))
    state.calibration = SimpleNamespace(  # type: ignore[assignment]
        monitor=SimpleNamespace(threshold=load_bank(demo_bank_path).monitor.threshold))
    state.classifier = SimpleNamespace(  # type: ignore[assignment]
        model=None, spec=SimpleNamespace(input_shape=(1, 28, 28)))
    state.projection = SimpleNamespace(tensors={})  # type: ignore[assignment]
    state.data = SimpleNamespace(  # type: ignore[assignment]
        ds={"test": SimpleNamespace(images=np.zeros((64, 28, 28, 1), np.uint8))})
    monkeypatch.setattr(pipeline, "MonitoredClassifier", lambda model, tensors: None)
    ctx = pipeline.Context(load_config(REPO / "configs" / "fashion-mnist-demo.yaml"), None,
                           progress=False, staging=tmp_path)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="conceptguard.build"):
        out = pipeline.fused_graph_stage(ctx, state)
    assert out.path is None
    assert out.fallback == ("the fused graph disagrees with numpy score() on test images "
                            "(p_anomaly differs by 0.0004 (tolerance 0.00035))")
    assert out.manifest_entry()["fallback"] == "classifier.onnx + numpy scoring"
    assert list(tmp_path.iterdir()) == []  # the written graph is gone
    assert any("no fused graph: the fused graph disagrees" in r.getMessage()
               for r in caplog.records)


@pytest.fixture
def fallback_bank(tiny_build: TinyBuild, tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                  ) -> Path:
    monkeypatch.setitem(DETECTORS, ConceptNorm.name, ConceptNorm)
    cfg = load_config(tiny_build.config)
    out = tmp_path_factory.mktemp("fallback") / "bank"
    with caplog.at_level(logging.WARNING, logger="conceptguard.build"):
        build_bank(cfg, out, progress=False)
    warned = [r.getMessage() for r in caplog.records if r.name == "conceptguard.build"]
    assert any("test_concept_norm" in m and "numpy scoring" in m for m in warned), warned
    return out


@pytest.mark.slow  # one in-process build-bank over the tiny config
def test_build_bank_falls_back_to_numpy_scoring_and_serves_the_same_scores(
        fallback_bank: Path, fashion_mnist_test) -> None:
    bank = load_bank(fallback_bank)
    m = bank.manifest
    assert m.fused_graph["written"] is False
    assert "test_concept_norm" in m.fused_graph["reason"]
    assert m.fused_graph["fallback"] == "classifier.onnx + numpy scoring"
    assert bank.fused_onnx_path is None and not (fallback_bank / "monitor.onnx").exists()
    assert "test_concept_norm" in feature_names()  # the trust model read the fake column
    assert "test_concept_norm" in (fusable(bank.monitor) or "")
    with pytest.raises(NotFusable, match="test_concept_norm"):
        MonitorGraph(bank.monitor)

    # served the way the service opens a bank: its loader picks classifier.onnx
    _, runtime = open_bank(fallback_bank, Settings(device="cpu", threads=1))
    assert runtime.graph == "classifier"
    sample = json.loads((fallback_bank / "report" / SAMPLE_FILE).read_text())
    images = to_tensor(fashion_mnist_test.images[sample["test_indices"]]).numpy()
    o = runtime.run(images)
    assert o.monitor is None
    got = score(bank.monitor, o.logits, o.features, o.concepts)
    # the fake detector's risk is computed, and is what it says
    np.testing.assert_allclose(got.risks["test_concept_norm"],
                               -np.linalg.norm(o.concepts.astype(np.float64), axis=1),
                               rtol=1e-12)
    # the offline job's numpy scores of the same test images: probabilities in [0, 1], from
    # float32 outputs of d-term sums (the sample's 7-decimal rounding is far below that)
    d = bank.manifest.dims.features
    assert got.predictions.tolist() == sample["predictions"]
    for key in ("trust", "p_misclassification", "p_anomaly", "p_adversarial",
                "p_unfamiliar"):
        assert_f32_close(getattr(got, key), np.asarray(sample[key]), terms=d, scale=1.0,
                         err_msg=key)
    far = np.abs(got.trust - bank.monitor.threshold) > f32_tolerance(got.trust, d, 1.0)
    assert far.sum() >= len(far) - 1
    assert got.reject[far].tolist() == np.asarray(sample["reject"])[far].tolist()
    assert [r for r, f in zip(got.reason, far, strict=True) if f] == \
        [r for r, f in zip(sample["reason"], far, strict=True) if f]
