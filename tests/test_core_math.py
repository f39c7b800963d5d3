"""Aligner, projection, heatmaps, metrics, heads, calibration: checked against independent
computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conceptguard.aligner import fit_aligner, mean_cosine, r2_score
from conceptguard.calibration import (
    CalibrationSpec,
    StreamShares,
    accept_index,
    choose_threshold,
    stream_weights,
)
from conceptguard.faults import localise
from conceptguard.gaussian import fit_class_gaussians
from conceptguard.heads import fit_head, fit_logistic, sigmoid
from conceptguard.heatmaps import binarise, build_heatmaps, class_means
from conceptguard.metrics import aurc, auroc, fpr_at_tpr, risk_at_coverage
from conceptguard.projection import concept_scores


def test_aligner_recovers_a_known_affine_map() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 16))
    w_true = rng.normal(size=(16, 8))
    b_true = rng.normal(size=8)
    v = z @ w_true + b_true
    a = fit_aligner(z, v)
    np.testing.assert_allclose(a.W, w_true, atol=1e-2)
    np.testing.assert_allclose(a.b, b_true, atol=1e-2)
    assert r2_score(a.transform(z), v) > 0.9999
    assert mean_cosine(a.transform(z), v) > 0.9999


def test_aligner_picks_stronger_ridge_for_noise() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(60, 50))
    v = rng.normal(size=(60, 4))  # no relation: ridge should shrink hard
    assert fit_aligner(z, v).lam >= 10.0
    with pytest.raises(ValueError, match="rows"):
        fit_aligner(z, v[:10])


def test_projection_is_the_same_in_numpy_and_torch() -> None:
    rng = np.random.default_rng(2)
    z, w, b = rng.normal(size=(5, 6)), rng.normal(size=(6, 4)), rng.normal(size=4)
    t = rng.normal(size=(3, 4))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    mu, sigma = rng.normal(size=3), rng.uniform(0.5, 2, size=3)
    got = concept_scores(z, w, b, t, mu, sigma)
    u = z @ w + b
    cos = (u / np.linalg.norm(u, axis=1, keepdims=True)) @ t.T
    np.testing.assert_allclose(got, (cos - mu) / sigma, rtol=1e-9)
    as_t = [torch.tensor(a) for a in (z, w, b, t, mu, sigma)]
    np.testing.assert_allclose(concept_scores(*as_t).numpy(), got, rtol=1e-9)


def test_heatmaps_equal_hand_computed_means() -> None:
    s = np.array([[1, 0], [3, 2], [0, 4], [2, 2], [5, 5], [1, 1]], dtype=np.float32)
    y = np.array([0, 0, 1, 1, 0, 1])
    yhat = np.array([0, 0, 1, 0, 1, 1])
    hm = build_heatmaps(s, y, yhat, 2, min_count=1)
    np.testing.assert_allclose(hm.gt[0], s[[0, 1, 4]].mean(0))
    np.testing.assert_allclose(hm.out[0], s[[0, 1, 3]].mean(0))
    np.testing.assert_allclose(hm.ok[0], s[[0, 1]].mean(0))
    np.testing.assert_allclose(hm.ok[1], s[[2, 5]].mean(0))
    np.testing.assert_allclose(hm.bad[0], s[3])  # truly 1, called 0
    np.testing.assert_allclose(hm.bad[1], s[4])
    np.testing.assert_allclose(hm.diff, hm.ok - hm.bad)
    assert hm.counts["bad"].tolist() == [1, 1]
    assert not hm.fallback["bad"].any()


def test_heatmap_fallback_is_flagged_and_pooled() -> None:
    s = np.array([[1, 0], [3, 2], [0, 4], [2, 2]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    yhat = np.array([0, 0, 1, 0])  # only class 0 has an incorrect input
    hm = build_heatmaps(s, y, yhat, 2, min_count=1)
    assert hm.fallback["bad"].tolist() == [False, True]
    offset = s[3] - hm.ok[0]  # pooled offset of every incorrect input
    np.testing.assert_allclose(hm.bad[1], hm.ok[1] + offset)
    assert hm.fallback["adv"].all()  # no adversarial inputs at all


def test_class_means_nan_for_empty_and_binarise() -> None:
    m, n = class_means(np.ones((2, 3)), np.array([0, 0]), 2)
    assert n.tolist() == [2, 0] and np.isnan(m[1]).all()
    d = np.array([[0.5, -0.1, -0.4]])
    assert binarise(d, 0.2).tolist() == [[1, 0, -1]]


def _brute_auroc(scores: np.ndarray, pos: np.ndarray) -> float:
    pairs = list(itertools.product(scores[pos], scores[~pos]))
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def test_auroc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=80).astype(float)
    pos = rng.random(80) < 0.3
    assert auroc(scores, pos) == pytest.approx(_brute_auroc(scores, pos))
    assert auroc(np.array([0.9, 0.1]), np.array([True, False])) == 1.0
    assert np.isnan(auroc(np.ones(3), np.zeros(3, bool)))


def test_aurc_and_risk_at_coverage_match_a_direct_loop() -> None:
    rng = np.random.default_rng(4)
    scores = rng.random(50)
    err = rng.random(50) < 0.2
    order = np.argsort(scores)
    risks = [err[order[:k]].mean() for k in range(1, 51)]
    assert aurc(scores, err) == pytest.approx(np.mean(risks))
    assert risk_at_coverage(scores, err, 0.9) == pytest.approx(risks[44])
    perfect = np.where(err, 1.0, 0.0)
    assert aurc(perfect, err) < aurc(-perfect, err)


def test_fpr_at_95_tpr() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    pos = np.array([True, True, False, True, False, False])
    # all three positives needed (ceil(0.95*3)=3): threshold 0.6 flags one negative of three
    assert fpr_at_tpr(scores, pos) == pytest.approx(1 / 3)


def test_logistic_matches_known_coefficients() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20000, 2))
    y = (rng.random(20000) < sigmoid(x @ np.array([2.0, -1.0]) + 0.5)).astype(float)
    w, b = fit_logistic(x, y, l2=0.0)
    np.testing.assert_allclose(w, [2.0, -1.0], atol=0.1)
    assert b == pytest.approx(0.5, abs=0.1)
    head = fit_head(x, y.astype(bool))
    assert auroc(head.probability(x), y.astype(bool)) > 0.8
    with pytest.raises(ValueError):
        fit_logistic(x, np.zeros(len(x)))


def test_class_gaussians_distance_is_mahalanobis() -> None:
    rng = np.random.default_rng(6)
    cov = np.array([[2.0, 0.6], [0.6, 1.0]])
    x = rng.multivariate_normal([0, 0], cov, size=20000)
    labels = np.zeros(len(x), dtype=int)
    g = fit_class_gaussians(x, labels, 1, shrinkage=0.0)
    q = np.array([[1.0, -1.0]])
    want = q @ np.linalg.inv(cov) @ q.T
    assert g.sq_distances(q)[0, 0] == pytest.approx(want[0, 0], rel=0.05)


def test_threshold_accepts_the_target_share_of_correct_inputs() -> None:
    rng = np.random.default_rng(7)
    trust = rng.random(1000)
    correct = rng.random(1000) < 0.9
    spec = CalibrationSpec(target="accept_correct", value=0.95, confidence=0.5)
    t = choose_threshold(trust, ~correct, np.ones(1000), correct, spec)
    assert (trust[correct] >= t).mean() >= 0.95
    assert (trust[correct] >= t).mean() < 0.96
    # with confidence 0.95 (the default) the threshold is stricter on the fitting data
    strict = choose_threshold(trust, ~correct, np.ones(1000), correct, CalibrationSpec())
    assert strict < t and (trust[correct] >= strict).mean() > 0.95
    risk_spec = CalibrationSpec(target="max_risk", value=0.05)
    bad = trust < 0.2  # errors live at low trust
    t2 = choose_threshold(trust, bad, np.ones(1000), correct, risk_spec)
    assert bad[trust >= t2].mean() <= 0.05


def test_accept_index_holds_the_target_on_new_data_with_its_confidence() -> None:
    """Simulated: n uniform scores of correct inputs; the share of new ones the threshold
    accepts is 1 - t[k]. Over many draws it reaches the target in at least ``confidence``
    of them (up to Monte Carlo error), and the next stricter index would not."""
    from scipy.stats import binom

    rng = np.random.default_rng(11)
    n, value, confidence, draws = 400, 0.9, 0.9, 4000
    k = accept_index(n, value, confidence)
    assert binom.cdf(n - k - 1, n, value) >= confidence > binom.cdf(n - k - 2, n, value)
    held = np.mean([1.0 - np.sort(rng.random(n))[k] >= value for _ in range(draws)])
    mc = 3.0 * np.sqrt(confidence * (1 - confidence) / draws)  # three standard errors
    assert held >= confidence - mc
    # the plain quantile (confidence 0.5) holds it about half the time only
    k_half = accept_index(n, value, 0.5)
    assert k_half == pytest.approx((1 - value) * n, abs=1.0)
    half = np.mean([1.0 - np.sort(rng.random(n))[k_half] >= value for _ in range(draws)])
    assert abs(half - 0.5) < 0.1
    assert accept_index(5, 0.99, 0.95) == 0  # too few scores: accept every one seen


def test_stream_weights_give_each_kind_its_share_and_families_equal_weight() -> None:
    group = np.array(["clean"] * 600 + ["attack"] * 300 + ["foreign"] * 100, dtype=object)
    family = np.array(["clean"] * 600 + ["pgd"] * 250 + ["cw"] * 50 + ["noise"] * 100,
                      dtype=object)
    w = stream_weights(group, family, StreamShares(clean=0.6, corruption=0.2, attack=0.1,
                                                   foreign=0.1))
    total = w.sum()
    # corruption is absent: the other shares are renormalised (0.6 / 0.8 = 0.75)
    assert w[group == "clean"].sum() / total == pytest.approx(0.75)
    assert w[group == "attack"].sum() / total == pytest.approx(0.125)
    assert w[family == "pgd"].sum() == pytest.approx(w[family == "cw"].sum())
    assert w.mean() == pytest.approx(1.0)


def test_fault_localisation_rules() -> None:
    y = np.array([0, 0, 0])
    oracle = np.array([0, 0, 2])  # third: VLM disagrees with the label
    encoder = np.array([0, 1, 0])
    assert localise(y, np.array([1, 1, 1]), oracle, encoder).tolist() == [
        "head", "encoder", "ambiguous"]


def test_zero_shot_labels_and_the_encoder_view() -> None:
    """The oracle is the nearest class prompt; the encoder view reads the features through
    the aligner first (normalised: a scaled feature row keeps its label)."""
    from conceptguard.faults import encoder_view_labels, verdict_counts, zero_shot_labels

    class_T = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    v = np.array([[0.9, 0.1], [0.2, 0.8], [-3.0, 1.0]])
    assert zero_shot_labels(v, class_T).tolist() == [0, 1, 2]
    W, b = np.array([[0.0, 1.0], [1.0, 0.0]]), np.zeros(2)  # the aligner swaps the axes
    z = np.array([[0.1, 0.9], [8.0, 2.0], [1.0, -5.0]])
    assert encoder_view_labels(z, W, b, class_T).tolist() == [0, 1, 2]
    assert verdict_counts(np.array(["head", "head", "ambiguous"], dtype=object)) == {
        "head": 2, "encoder": 0, "ambiguous": 1}


def test_bootstrap_auroc_and_aurc_equal_the_plain_ones_on_the_resampled_data() -> None:
    from conceptguard.metrics import bootstrap_counts, interval, weighted_aurc, weighted_auroc

    rng = np.random.default_rng(8)
    risk = rng.normal(size=400).round(1)  # ties
    err = rng.random(400) < 0.2 + 0.1 * np.clip(risk, -1, 1)
    ones = np.ones((1, 400))
    assert weighted_auroc(risk, err, ones)[0] == pytest.approx(auroc(risk, err))
    assert weighted_aurc(risk, err, ones)[0] == pytest.approx(aurc(risk, err))
    counts = bootstrap_counts(400, 5, seed=1)
    for row, b in zip(counts, weighted_auroc(risk, err, counts), strict=True):
        idx = np.repeat(np.arange(400), row.astype(int))
        assert b == pytest.approx(auroc(risk[idx], err[idx]))
    lo, hi = interval(weighted_auroc(risk, err, bootstrap_counts(400, 300, seed=2)))
    assert lo < auroc(risk, err) < hi and hi - lo < 0.2
