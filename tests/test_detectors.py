"""Every registered detector against the OOD-detection library's own implementation
(pytorch-ood), fitted on the same reference outputs of the shipped demo bank; and the
registry's round trip through bank tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conceptguard.bank import load_bank
from conceptguard.calibration import Batch, DetectorConfig
from conceptguard.classifier.inference import to_tensor
from conceptguard.classifier.io import load_classifier
from conceptguard.data import load_source, make_splits
from conceptguard.detectors import (
    BASELINES,
    DETECTORS,
    KNN,
    DetectorSettings,
    FitData,
    Outputs,
    detector_risks,
    detectors_from_state,
    detectors_state,
    scaled_k,
    stratified_subset,
)
from conceptguard.projection import unit_rows
from conceptguard.runtime import OnnxRuntime
from offline.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _served(rt: OnnxRuntime, images: np.ndarray, labels: np.ndarray) -> Batch:
    parts = [rt.run(to_tensor(images[i:i + 500]).numpy()) for i in range(0, len(images), 500)]
    return Batch(*(np.concatenate([getattr(p, f) for p in parts])
                   for f in ("logits", "features", "concepts")), labels)


@pytest.fixture(scope="module")
def demo(demo_bank_path: Path):
    bank = load_bank(demo_bank_path)
    cfg = load_config(REPO / "configs" / "fashion-mnist-demo.yaml")
    train, test = load_source(cfg.data)
    splits = make_splits(len(train), len(test), cfg.splits)
    assert splits.digest() == bank.manifest.data["splits_digest"], \
        "the demo config no longer describes the shipped bank's splits"
    rt = OnnxRuntime(bank.onnx_path, device="cpu")
    ref = _served(rt, train.images[splits.reference], train.labels[splits.reference])
    tst = _served(rt, test.images[:600], test.labels[:600])
    model, _, _ = load_classifier(bank.classifier_path)
    return bank, ref, tst, model


def _knn_rows(bank, labels: np.ndarray) -> np.ndarray:
    """The reference rows the bank's KNN was fitted on, from the settings it was built with."""
    cfg = DetectorConfig(**bank.manifest.calibration["spec"]["detectors"])
    return stratified_subset(labels, cfg.knn_reference, cfg.knn_seed)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float32))


def test_every_baseline_matches_pytorch_ood(demo) -> None:
    from pytorch_ood.detector import KNN as OodKNN
    from pytorch_ood.detector import (
        EnergyBased,
        Entropy,
        Mahalanobis,
        MaxLogit,
        MaxSoftmax,
        ReAct,
        ViM,
    )

    bank, ref, tst, model = demo
    ours = detector_risks(bank.monitor.detectors, tst.outputs)
    logits, z = _t(tst.logits), _t(tst.features)
    zr, yr = _t(ref.features), torch.as_tensor(ref.labels)
    head = model.head
    w, b = head.weight.detach(), head.bias.detach()
    d = bank.monitor.detectors
    knn_rows = torch.as_tensor(_knn_rows(bank, ref.labels))
    theirs = {
        "msp": MaxSoftmax.score(logits),
        "max_logit": MaxLogit.score(logits),
        "energy": EnergyBased.score(logits),
        "entropy": Entropy.score(logits),
        "mahalanobis": Mahalanobis(None).fit_features(zr, yr).predict_features(z),
        "knn": OodKNN(None, k=d["knn"].k).fit_features(zr[knn_rows], yr[knn_rows])
        .predict_features(z),
        "vim": ViM(None, d=d["vim"].residual_basis.shape[0] - d["vim"].residual_basis.shape[1],
                   w=w, b=b).fit_features(zr, yr).predict_features(z),
    }
    react = ReAct(None, head=head, detector=EnergyBased.score, percentile=0.9)
    react.fit_feature_maps(zr, yr)
    with torch.no_grad():
        theirs["react_energy"] = react.predict_feature_maps(z)
    # DOCTOR is not in the library: its paper's formula, (1 - g) / g with g = sum p^2
    p = torch.softmax(logits.double(), 1)
    g = (p * p).sum(1)
    theirs["doctor"] = (1 - g) / g
    assert set(theirs) == set(BASELINES)
    for name in BASELINES:
        t = np.asarray(theirs[name].detach().double().numpy())
        # value agreement (Mahalanobis: our covariance is shrunk by 1e-3 towards its mean
        # variance, so compare ranks there)
        if name == "mahalanobis":
            rho = np.corrcoef(np.argsort(np.argsort(ours[name])), np.argsort(np.argsort(t)))
            assert rho[0, 1] > 0.995, name
        else:
            np.testing.assert_allclose(ours[name], t, rtol=2e-3, atol=2e-3, err_msg=name)


def test_detector_state_round_trips_through_bank_tensors(demo) -> None:
    bank, _, tst, _ = demo
    tensors = detectors_state(bank.monitor.detectors)
    assert all(k.startswith("detector.") for k in tensors)
    again = detectors_from_state(tensors)
    assert list(again) == list(DETECTORS)
    a = detector_risks(bank.monitor.detectors, tst.outputs)
    b = detector_risks(again, tst.outputs)
    for name in DETECTORS:
        np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(ValueError, match="detector 'knn'"):
        detectors_from_state({k: v for k, v in tensors.items() if k != "detector.knn.bank"})


def test_risks_rise_on_foreign_inputs(demo) -> None:
    """A sanity check of the convention (higher = more suspicious) on an obvious case."""
    bank, _, tst, _ = demo
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(200, 28, 28, 1), dtype=np.uint8)
    rt = OnnxRuntime(bank.onnx_path, device="cpu")
    o = rt.run(to_tensor(noise).numpy())
    far = detector_risks(bank.monitor.detectors, Outputs(o.logits, o.features, o.concepts))
    near = detector_risks(bank.monitor.detectors, tst.outputs)
    for name in ("mahalanobis", "knn", "vim"):
        assert np.median(far[name]) > np.quantile(near[name], 0.9), name


def test_knn_reference_subset_is_class_stratified_and_seeded() -> None:
    rng = np.random.default_rng(1)
    labels = rng.choice(4, size=1003, p=[0.4, 0.3, 0.2, 0.1])
    rows = stratified_subset(labels, 250, seed=0)
    assert len(rows) == 250 and len(np.unique(rows)) == 250
    assert np.all(np.diff(rows) > 0)  # sorted, in the reference split's order
    counts, kept = np.bincount(labels, minlength=4), np.bincount(labels[rows], minlength=4)
    np.testing.assert_array_less(np.abs(kept - counts * 250 / len(labels)), 1.0)
    np.testing.assert_array_equal(stratified_subset(labels, 250, seed=0), rows)
    assert not np.array_equal(stratified_subset(labels, 250, seed=1), rows)
    np.testing.assert_array_equal(stratified_subset(labels, None, seed=0),
                                  np.arange(len(labels)))
    np.testing.assert_array_equal(stratified_subset(labels, 5000, seed=0),
                                  np.arange(len(labels)))


@pytest.mark.parametrize(("k", "size", "total", "want"), [
    (10, 4000, 4000, 10),  # the whole set: k itself
    (10, 2000, 4000, 5),
    (10, 1000, 4000, 3),  # 2.5 rounds up: never a smaller share than k of the whole
    (10, 300, 4000, 1),
    (10, 1, 4000, 1),
    (50, 8, 10, 8),  # at most the subset's size
    (10, 6, 6, 6),  # a whole set smaller than k
])
def test_knn_k_scales_with_the_reference_subset(k: int, size: int, total: int,
                                                want: int) -> None:
    got = scaled_k(k, size, total)
    assert got == want
    # the k-th nearest of the subset sits at no smaller a share of it than k of the whole
    # (where the subset has room for it)
    if want < size:
        assert got / size >= k / total


def test_knn_fit_keeps_the_seeded_subset(demo) -> None:
    bank, ref, _, _ = demo
    heat = bank.monitor.heatmaps

    def fit(size: int | None, seed: int = 0) -> KNN:
        data = FitData(ref.outputs, ref.labels, bank.monitor.num_classes, heat.h_ok,
                       heat.h_bad, heat.h_adv, DetectorSettings(knn_reference=size,
                                                                knn_seed=seed))
        knn = KNN.fit(data)
        assert isinstance(knn, KNN)
        return knn

    a, b = fit(300), fit(300)
    np.testing.assert_array_equal(a.bank, b.bank)  # the same fit twice: the same subset
    assert not np.array_equal(fit(300, seed=1).bank, a.bank)
    rows = stratified_subset(ref.labels, 300, 0)
    np.testing.assert_array_equal(a.bank, unit_rows(ref.features.astype(np.float64))[rows]
                                  .astype(np.float32))
    assert len(fit(None).bank) == len(ref.labels)
    n = len(ref.labels)
    assert fit(None).k == DetectorSettings().knn_k  # the whole split: k as set
    assert fit(n // 2).k == scaled_k(DetectorSettings().knn_k, n // 2, n)  # k shrinks with it


def test_shipped_bank_knn_holds_its_stratified_subset(demo) -> None:
    """The bank's KNN reference set is the subset its settings name (rows of the reference
    split's unit features, every class in proportion), and it round-trips through the bank's
    tensors unchanged."""
    bank, ref, _, _ = demo
    knn = bank.monitor.detectors["knn"]
    assert isinstance(knn, KNN)
    rows = _knn_rows(bank, ref.labels)
    assert knn.bank.shape == (len(rows), ref.features.shape[1])
    np.testing.assert_allclose(knn.bank, unit_rows(ref.features.astype(np.float64))[rows],
                               rtol=0, atol=1e-5)
    counts = np.bincount(ref.labels[rows], minlength=bank.monitor.num_classes)
    assert counts.max() - counts.min() <= np.ptp(np.bincount(ref.labels)) * len(rows) / \
        len(ref.labels) + 1
    again = detectors_from_state(detectors_state(bank.monitor.detectors))["knn"]
    assert isinstance(again, KNN)
    np.testing.assert_array_equal(again.bank, knn.bank)
    assert again.k == knn.k


def test_each_detector_declares_settings_that_exist_and_config_maps_by_name() -> None:
    """``settings_used`` names fields of DetectorSettings, every config field is a detector's
    own setting (and read by it), and DetectorConfig fills DetectorSettings by name."""
    from conceptguard.detectors import SHARED_SETTINGS

    settings = set(DetectorSettings.model_fields)
    used = {s for cls in DETECTORS.values() for s in cls.settings_used}
    assert used <= settings, used - settings
    own = {s for cls in DETECTORS.values() for s in cls.own_settings}
    assert set(DetectorConfig.model_fields) == own <= used
    assert settings == own | set(SHARED_SETTINGS)
    cfg = DetectorConfig(knn_k=3, knn_reference=70, knn_seed=5, vim_dim=4,
                         react_percentile=0.8)
    got = cfg.settings(shrinkage=0.02)
    assert (got.knn_k, got.knn_reference, got.knn_seed, got.vim_dim, got.react_percentile,
            got.shrinkage) == (3, 70, 5, 4, 0.8, 0.02)


def test_hinged_detectors_are_the_trust_models_hinges() -> None:
    from conceptguard.trust import HINGE_QUANTILES, HINGED, feature_names

    # the order of the knots stored in every bank (trust.knots rows)
    assert HINGED == ("mahalanobis", "knn", "vim", "react_energy", "concept_mahalanobis")
    assert {c.group for c in DETECTORS.values() if c.hinged} <= {"density", "concept"}
    hinge_cols = [n for n in feature_names() if ">q" in n]
    assert hinge_cols == [f"{n}>q{int(q * 100)}" for n in HINGED for q in HINGE_QUANTILES]


def test_fused_feature_forms_equal_the_numpy_features(demo) -> None:
    """Each detector's ``Fused.feature`` (what the graph computes for the trust model)
    gives :meth:`Detector.feature` of its risk, on the demo bank's test outputs."""
    bank, _, tst, _ = demo
    risks = detector_risks(bank.monitor.detectors, tst.outputs)
    p_max = tst.outputs.probabilities.max(1)
    r = (1.0 - p_max) / p_max
    for name, det in bank.monitor.detectors.items():
        form = det.fused()
        assert form is not None, name
        want = DETECTORS[name].feature(risks[name])
        f = form.feature
        if f is None:
            got = risks[name]
        else:
            x = r if f.of_r else risks[name]
            got = np.log(np.maximum(x, f.lo) + f.eps)
        # both float64, a few operations apart (log vs. log1p of distances >> 1)
        eps64 = float(np.finfo(np.float64).eps)
        np.testing.assert_allclose(got, want, rtol=64 * eps64,
                                   atol=64 * eps64 * float(np.abs(want).max()), err_msg=name)


def test_a_detector_s_own_settings_come_from_its_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """A detector added to the registry brings its settings with it (no other edit): they
    join the settings the config and DetectorSettings are built from; a name two detectors
    declare is refused."""
    from typing import Any, ClassVar

    from pydantic import Field

    from conceptguard import detectors as mod

    class Margin(mod.Detector):
        name, group, summary = "margin_test", "confidence", "a test detector"
        own_settings: ClassVar[dict[str, tuple[Any, Any]]] = {
            "margin_floor": (float, Field(0.5, ge=0))}

        def risk(self, out: mod.Outputs) -> np.ndarray:
            return np.zeros(len(out.logits))

    assert Margin.settings_used == ("margin_floor",)
    monkeypatch.setitem(mod.DETECTORS, Margin.name, Margin)
    fields = mod.settings_fields()
    assert fields["margin_floor"][1].default == 0.5 and "knn_k" in fields

    class Twin(Margin):
        name = "twin_test"

    monkeypatch.setitem(mod.DETECTORS, Twin.name, Twin)
    with pytest.raises(TypeError, match="margin_floor"):
        mod.settings_fields()
