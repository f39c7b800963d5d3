"""The monitor as an ONNX graph against the numpy reference ``score()``, on the shipped demo
bank's test sample (Fashion-MNIST test indices in ``report/test_scores_sample.json``).

The graph computes in float32, ``score()`` in float64. Tolerances: 1e-5 absolute on trust,
the four head probabilities and the softmax; risks 1e-5 relative to each detector's largest
|risk| on the sample (the Mahalanobis risks are squared distances of ~250, where float32
resolves ~3e-5); contributions and graph-vs-graph comparisons: the float32 bound of
``tests/tolerance.py`` for sums as long as the inputs (concepts K, features d). Boolean
and integer outputs must be equal, except where the float value they threshold lies within
the tolerance of the threshold (none does on the sample; the test says so if one appears).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conceptguard.bank import Bank, load_bank
from conceptguard.classifier.inference import to_tensor
from conceptguard.monitor_graph import (
    FUSED_OUTPUTS,
    MONITOR_INPUTS,
    MONITOR_OUTPUTS,
    RISK_NAMES,
    MonitorGraph,
    export_bank_fused_onnx,
    export_monitor_onnx,
)
from conceptguard.runtime import OnnxRuntime
from conceptguard.scoring import REASON_KINDS, Scores, score
from tests.tolerance import assert_f32_close

ort = pytest.importorskip("onnxruntime")

HEADS = ("p_misclassification", "p_anomaly", "p_adversarial", "p_unfamiliar")


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def bank(demo_bank_path: Path) -> Bank:
    return load_bank(demo_bank_path)


@pytest.fixture(scope="module")
def sample_images(fashion_mnist_test, test_scores_sample: dict[str, Any]) -> np.ndarray:
    return to_tensor(fashion_mnist_test.images[test_scores_sample["test_indices"]]).numpy()


@pytest.fixture(scope="module")
def graphs(bank: Bank, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("monitor_graph")
    d = bank.manifest.dims
    export_bank_fused_onnx(bank, folder / "fused.onnx")
    export_monitor_onnx(bank.monitor, (d.classes, d.features, d.concepts),
                        folder / "monitor.onnx")
    return {"fused": folder / "fused.onnx", "monitor": folder / "monitor.onnx"}


@pytest.fixture(scope="module")
def fused(graphs: dict[str, Path], sample_images: np.ndarray) -> dict[str, np.ndarray]:
    out = _session(graphs["fused"]).run(list(FUSED_OUTPUTS), {"images": sample_images})
    return dict(zip(FUSED_OUTPUTS, out, strict=True))


def assert_matches(got: dict[str, np.ndarray], ref: Scores, threshold: float) -> None:
    """Every monitor output of the graph against ``score()`` (tolerances: module doc)."""
    np.testing.assert_array_equal(got["predictions"], ref.predictions)
    np.testing.assert_allclose(got["probabilities"], ref.probabilities, rtol=0, atol=1e-5)
    assert got["risks"].shape == (len(ref), len(ref.risks))
    assert list(ref.risks)[:len(RISK_NAMES)] == list(RISK_NAMES)  # registry order
    for i, name in enumerate(ref.risks):
        scale = max(float(np.abs(ref.risks[name]).max()), 1.0)
        np.testing.assert_allclose(got["risks"][:, i], ref.risks[name], rtol=0,
                                   atol=1e-5 * scale, err_msg=name)
    for key in HEADS:
        np.testing.assert_allclose(got[key], getattr(ref, key), rtol=0, atol=1e-5,
                                   err_msg=key)
    # the graph's trust is the raw score: the calibration map is applied after it
    # (scoring.scores_from_graph), and ``threshold`` is on the raw scale
    raw = ref.trust if ref.raw_trust is None else ref.raw_trust
    np.testing.assert_allclose(got["trust"], raw, rtol=0, atol=1e-5)
    assert_f32_close(got["contributions"], ref.contributions,
                     terms=got["contributions"].shape[-1], err_msg="contributions")

    near = np.abs(raw - threshold) < 1e-5
    assert got["reject"].dtype == np.bool_
    np.testing.assert_array_equal(got["reject"][~near], ref.reject[~near])
    reasons = [REASON_KINDS[int(i)] for i in got["reason"]]
    assert [r for r, n in zip(reasons, near, strict=True) if not n] == \
        [r for r, n in zip(ref.reason, near, strict=True) if not n]
    rule_near = np.abs(ref.risks["paper_rule"]) < 1e-5
    np.testing.assert_array_equal(got["paper_rule_reject"][~rule_near],
                                  ref.paper_rule_reject[~rule_near])


def test_fused_graph_matches_numpy_score_on_its_own_outputs(
        bank: Bank, fused: dict[str, np.ndarray]) -> None:
    ref = score(bank.monitor, fused["logits"], fused["features"], fused["concepts"])
    assert not (np.abs(ref.raw_trust - bank.monitor.threshold) < 1e-5).any()
    assert_matches(fused, ref, bank.monitor.threshold)
    assert set(ref.reason) >= {"accepted", "misclassification-like"}  # the sample rejects some


def test_fused_graph_classifier_outputs_equal_the_banks_serving_graph(
        bank: Bank, fused: dict[str, np.ndarray], sample_images: np.ndarray) -> None:
    """Both graphs hold the same float32 classifier; ONNX Runtime may pick other kernels
    (another summation order) for each, so they agree to float32 rounding of the widest
    accumulation feeding each output (the d features), at the outputs' own scale."""
    o = OnnxRuntime(bank.onnx_path, device="cpu", threads=1).run(sample_images)
    d = bank.manifest.dims.features
    for key in ("logits", "features", "concepts"):
        assert_f32_close(fused[key], getattr(o, key), terms=d, err_msg=key)


def test_fused_graph_reproduces_the_offline_sample(fused: dict[str, np.ndarray],
                                                   test_scores_sample: dict[str, Any]) -> None:
    s = test_scores_sample
    assert fused["predictions"].tolist() == s["predictions"]
    np.testing.assert_allclose(fused["trust"], s.get("raw_trust", s["trust"]), rtol=0,
                               atol=1e-5)
    for key in ("p_misclassification", "p_anomaly", "p_adversarial", "p_unfamiliar"):
        np.testing.assert_allclose(fused[key], s[key], rtol=0, atol=1e-5, err_msg=key)
    assert fused["reject"].tolist() == s["reject"]
    assert [REASON_KINDS[int(i)] for i in fused["reason"]] == s["reason"]


def test_monitor_alone_graph_matches_score_and_the_fused_graph(
        bank: Bank, graphs: dict[str, Path], fused: dict[str, np.ndarray]) -> None:
    sess = _session(graphs["monitor"])
    assert [i.name for i in sess.get_inputs()] == list(MONITOR_INPUTS)
    feeds = {k: fused[k] for k in MONITOR_INPUTS}
    got = dict(zip(MONITOR_OUTPUTS, sess.run(list(MONITOR_OUTPUTS), feeds), strict=True))
    assert_matches(got, score(bank.monitor, *feeds.values()), bank.monitor.threshold)
    d = bank.manifest.dims.features
    assert_f32_close(got["trust"], fused["trust"], terms=d, err_msg="trust")
    # dynamic batch: one input at a time gives the same as the batch
    one = sess.run(["trust"], {k: v[5:6] for k, v in feeds.items()})[0]
    assert_f32_close(one, fused["trust"][5:6], terms=d, err_msg="trust, batch of one")


def test_confident_logits_keep_float64_accuracy(bank: Bank, fused: dict[str, np.ndarray]
                                                ) -> None:
    """Logits scaled up so that ``p_max`` is within 1e-8 of 1: float32 ``1 - p`` would be
    0 there; the graph's rearranged confidence features still match float64."""
    logits = fused["logits"] * 6.0
    ref = score(bank.monitor, logits, fused["features"], fused["concepts"])
    assert (1.0 - ref.probabilities.max(1) < 1e-8).sum() > 10
    with torch.no_grad():
        out = MonitorGraph(bank.monitor)(*(torch.from_numpy(np.ascontiguousarray(a))
                                           for a in (logits, fused["features"],
                                                     fused["concepts"])))
    got = {k: v.numpy() for k, v in zip(MONITOR_OUTPUTS, out, strict=True)}
    assert_matches(got, ref, bank.monitor.threshold)


def test_monitor_graph_stays_small_after_onnx_runtime_optimisation(
        bank: Bank, graphs: dict[str, Path], tmp_path: Path) -> None:
    """At batch 1 the monitor's cost is one dispatch per node: the monitor-only graph, as
    ONNX Runtime runs it, keeps to the ~70 nodes of the wide-operation layout (it was 134
    before; a regression to per-column operations would show here). Its KNN reads the
    bank's reference subset."""
    import onnx

    out = tmp_path / "optimised.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(graphs["monitor"]), opts, providers=["CPUExecutionProvider"])
    assert len(onnx.load(str(out)).graph.node) <= 72
    knn = bank.monitor.detectors["knn"]
    assert MonitorGraph(bank.monitor).knn_bank_t.shape == knn.bank.T.shape


def test_a_rebuilt_graph_equals_the_banks_stored_graph(
        bank: Bank, fused: dict[str, np.ndarray], sample_images: np.ndarray) -> None:
    """The graph the registry builds today against ``monitor.onnx`` as the demo bank stores
    it (exported by earlier code from the same tensors), on the same images: the served
    outputs stay the same (float32 bound of d-term sums; booleans and codes equal)."""
    stored = _session(bank.fused_onnx_path).run(list(FUSED_OUTPUTS), {"images": sample_images})
    d = bank.manifest.dims.features
    for key, old in zip(FUSED_OUTPUTS, stored, strict=True):
        new = fused[key]
        assert new.shape == old.shape and new.dtype == old.dtype, key
        if new.dtype.kind in "biu":
            np.testing.assert_array_equal(new, old, err_msg=key)
        else:
            assert_f32_close(new, old, terms=d, err_msg=key)


def test_a_detector_without_a_fused_form_is_named_and_refused(bank: Bank) -> None:
    from dataclasses import replace

    from conceptguard.detectors import FeatureNorm
    from conceptguard.monitor_graph import NotFusable, fusable

    class Unfused(FeatureNorm):
        def fused(self):  # type: ignore[override]
            return None

    assert fusable(bank.monitor) is None
    monitor = replace(bank.monitor, detectors={**bank.monitor.detectors,
                                               "feature_norm": Unfused()})
    assert "'feature_norm' (Unfused) has no fused form" in (fusable(monitor) or "")
    with pytest.raises(NotFusable, match="feature_norm"):
        MonitorGraph(monitor)


def test_a_registered_detector_with_a_fused_form_enters_the_graph(
        bank: Bank, fused: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry drives the graph: a detector registered after import, whose fused form
    is a combination of shared quantities (``logsumexp l = l_max + log(1 + r)``), becomes a
    ``risks`` column equal to its numpy risk, with no edit to the graph builder. The trust
    model gets a zero-weight column for it, so trust stays the bank's."""
    from dataclasses import replace

    from conceptguard.detectors import DETECTORS, Detector, Fused, logsumexp
    from conceptguard.heads import LogisticHead
    from conceptguard.trust import TrustModel

    class LogSumExp(Detector):
        name, group, summary = "test_logsumexp", "statistic", "logsumexp (test only)"

        def risk(self, out):
            return logsumexp(out.logits)

        def fused(self) -> Fused:
            return Fused({"l_max": 1.0, "log1p_r": 1.0})

    monkeypatch.setitem(DETECTORS, LogSumExp.name, LogSumExp)
    col = list(DETECTORS).index(LogSumExp.name)  # its design column: last before hinges
    tm = bank.monitor.trust_model

    def widened(h: LogisticHead, mis: bool) -> LogisticHead:
        if mis:  # the misclassification head reads the confidence columns only
            return h
        return LogisticHead(np.insert(h.mean, col, 0.0), np.insert(h.scale, col, 1.0),
                            np.insert(h.w, col, 0.0), h.b)

    trust_model = TrustModel(tm.knots, {k: widened(h, k == "misclassification")
                                        for k, h in tm.heads.items()},
                             np.insert(tm.mis_columns, col, False))
    monitor = replace(bank.monitor, trust_model=trust_model,
                      detectors={**bank.monitor.detectors, LogSumExp.name: LogSumExp()})
    graph = MonitorGraph(monitor)
    assert graph.risk_names[-1] == LogSumExp.name
    inputs = [fused[k] for k in MONITOR_INPUTS]
    with torch.no_grad():
        out = graph(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
    got = dict(zip(MONITOR_OUTPUTS, (t.numpy() for t in out), strict=True))
    ref = score(monitor, *inputs)
    assert_matches(got, ref, monitor.threshold)  # every column, the new one included
    c = bank.manifest.dims.classes
    assert_f32_close(got["risks"][:, -1], ref.risks[LogSumExp.name], terms=c,
                     err_msg="the new detector's column")
    assert_f32_close(got["trust"], fused["trust"], terms=bank.manifest.dims.features,
                     err_msg="trust with a zero-weight column")


def test_monitor_graph_state_rebuilds_the_same_module(bank: Bank, sample_images: np.ndarray,
                                                      tmp_path: Path) -> None:
    """``MonitorGraph.state()`` written as safetensors and read back with the stdlib reader
    of ``benchmarks/gpu.py`` (no safetensors package, no bank loader) rebuilds a module whose
    outputs equal the original's: the same constants through the same operations."""
    import importlib.util

    from safetensors.numpy import save_file

    from conceptguard.classifier.io import load_classifier
    from conceptguard.export import MonitoredClassifier

    graph = MonitorGraph(bank.monitor).eval()
    tensors, meta = graph.state()
    save_file(tensors, str(tmp_path / "state.safetensors"), metadata=meta)
    spec = importlib.util.spec_from_file_location(
        "gpu_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    again = MonitorGraph.from_state(*gpu.read_safetensors(tmp_path / "state.safetensors"))
    serving = MonitoredClassifier(load_classifier(bank.classifier_path)[0], bank.projection())
    with torch.inference_mode():
        inputs = serving.eval()(torch.from_numpy(sample_images))
        want, got = graph(*inputs), again(*inputs)
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a monitor graph state"):
        MonitorGraph.from_state(tensors, {})


def test_torch_backend_runs_the_monitor_in_its_module(bank: Bank, sample_images: np.ndarray,
                                                     fused: dict[str, np.ndarray]) -> None:
    """On a bank with a fused graph the service's torch backend is one module, classifier
    and monitor (``graph="fused"``): every monitor output matches numpy ``score()`` on its
    own classifier outputs, as the ONNX graph's do, and its decisions are the ONNX graph's."""
    from service.bank_loader import make_runtime
    from service.settings import Settings

    assert bank.fused_onnx_path is not None
    rt = make_runtime(bank, Settings(bank=bank.path, backend="torch", device="cpu",
                                     threads=0))
    assert (rt.name, rt.graph, rt.device) == ("torch", "fused", "cpu")
    got = rt.run(sample_images)
    assert got.monitor is not None and set(got.monitor) == set(MONITOR_OUTPUTS)
    ref = score(bank.monitor, got.logits, got.features, got.concepts)
    assert_matches(got.monitor, ref, bank.monitor.threshold)
    for key in ("predictions", "reject", "reason", "paper_rule_reject"):
        assert got.monitor[key].dtype == fused[key].dtype, key
        np.testing.assert_array_equal(got.monitor[key], fused[key], err_msg=key)
    # classify() is still the classifier alone: the same kernels on the same input
    np.testing.assert_array_equal(rt.classify(sample_images), got.logits)


def test_graph_tolerance_grows_with_the_scores_float32_sensitivity(
        bank: Bank, fused: dict[str, np.ndarray]) -> None:
    """The load/build check's tolerance: 1e-4 on a well-conditioned bank (the demo's
    scores move by far less under float32 rounding), and a multiple of the scores' change
    under input perturbations where they move more (a classifier with large logits got
    'raw_trust differs by 0.000152' at the end of a valid build)."""
    from conceptguard.scoring import GRAPH_TOLERANCE, graph_tolerance

    args = (bank.monitor, fused["logits"], fused["features"], fused["concepts"])
    ref = score(*args)
    assert graph_tolerance(*args, ref) == GRAPH_TOLERANCE
    small, large = (graph_tolerance(*args, ref, ulps=u, factor=1.0) for u in (4e3, 4e4))
    assert GRAPH_TOLERANCE < small < large  # the score's change, scaled
    assert large == pytest.approx(10 * small, rel=0.5)  # about linear at this size
