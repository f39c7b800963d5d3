"""The evaluation's statistics: the clustered bootstrap, Holm's adjustment, the paired AURC
differences on traffic mixes, and the comparators chosen on the calibration stream."""

from __future__ import annotations

import numpy as np

from conceptguard.calibration import Batch, choose_comparators
from conceptguard.detectors import BASELINES, DETECTORS
from conceptguard.evaluation import (
    COMPOSITIONS,
    EvalSet,
    aurc_comparison,
    compare,
    composition_sections,
    stream_summary,
    summary_table,
)
from conceptguard.metrics import (
    bootstrap_pvalue,
    cluster_bootstrap_blocks,
    holm,
    weighted_aurc,
)
from conceptguard.scoring import Scores


def test_clustered_bootstrap_moves_an_image_and_its_variants_together() -> None:
    clusters = np.repeat(np.arange(50), 3)  # 50 images, 3 variants each
    blocks = list(cluster_bootstrap_blocks(clusters, 40, seed=0, max_elements=300))
    counts = np.concatenate(blocks)
    assert counts.shape == (40, 150) and len(blocks) > 1  # in blocks, all 40 rows
    per_image = counts.reshape(40, 50, 3)
    assert np.all(per_image == per_image[:, :, :1])  # variants share the multiplicity
    assert np.all(counts.sum(1) == 150)  # 50 clusters drawn, 3 inputs each
    # the same seed gives the same draws whatever the block size
    again = np.concatenate(list(cluster_bootstrap_blocks(clusters, 40, seed=0)))
    np.testing.assert_array_equal(counts, again)


def test_clustered_interval_is_wider_when_variants_are_copies() -> None:
    """Three identical copies of each input: resampling them independently pretends there
    are three times as many independent inputs; clustering by source does not."""
    rng = np.random.default_rng(1)
    base = rng.random(200)
    err = rng.random(200) < base * 0.6
    risk, error = np.tile(base, 3), np.tile(err, 3)
    source = np.tile(np.arange(200), 3)

    def width(clusters: np.ndarray) -> float:
        samples = np.concatenate([weighted_aurc(risk, error, c) for c in
                                  cluster_bootstrap_blocks(clusters, 400, seed=2)])
        lo, hi = np.quantile(samples, [0.025, 0.975])
        return float(hi - lo)

    assert width(source) > 1.4 * width(np.arange(600))


def test_holm_matches_the_step_down_rule() -> None:
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")}
    adj = holm(p)
    assert abs(adj["a"] - 0.03) < 1e-12  # 3 tested: 0.01 * 3
    assert abs(adj["c"] - 0.06) < 1e-12  # 0.03 * 2
    assert abs(adj["b"] - 0.06) < 1e-12  # 0.04 * 1, raised to stay monotone
    assert np.isnan(adj["d"])
    assert holm({"x": 0.9, "y": 0.8})["x"] == 1.0  # capped


def test_bootstrap_pvalue_counts_resamples_at_or_below_the_bound() -> None:
    s = np.array([-0.02, -0.01, 0.0, 0.01, 0.02, np.nan])
    assert abs(bootstrap_pvalue(s, 0.0) - 4 / 6) < 1e-12  # (1 + 3) / (1 + 5)
    assert abs(bootstrap_pvalue(s, -0.05) - 1 / 6) < 1e-12


def _scores(n: int, trust: np.ndarray, heads: dict[str, np.ndarray], risks: dict) -> Scores:
    z = np.zeros(n)
    return Scores(
        probabilities=np.full((n, 2), 0.5), predictions=np.zeros(n, np.int64), risks=risks,
        p_misclassification=heads.get("misclassification", z),
        p_anomaly=heads.get("anomaly", z), p_adversarial=heads.get("adversarial", z),
        p_unfamiliar=heads.get("unfamiliar", z), trust=trust, reject=trust < 0.5,
        reason=["accepted" if t >= 0.5 else "unfamiliar" for t in trust],
        paper_rule_reject=np.zeros(n, bool), contributions=np.zeros((n, 1)))


def test_paired_aurc_difference_finds_the_better_ranking() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    error = rng.random(n) < 0.2
    good = error + rng.normal(0, 0.4, n)  # ranks errors well
    risks = {m: error + rng.normal(0, 1.5, n) for m in BASELINES}
    risks["trust"] = good
    out = aurc_comparison(risks, error, np.arange(n) // 2, resamples=300, seed=0)
    assert out["lowest_everywhere"]
    for m in BASELINES:
        d = out["trust_minus"][m]
        assert d["ci95"][1] < 0 and d["p"] < 0.01
        assert abs(d["diff"] - (out["trust"]["aurc"] - out[m]["aurc"])) < 1e-4
    # a peer equal to trust: no claim
    risks["knn"] = good
    out = aurc_comparison(risks, error, np.arange(n), resamples=300, seed=0)
    assert not out["lowest_everywhere"] and out["p_not_lowest"] > 0.5


def test_compare_reports_heads_against_the_calibration_comparator() -> None:
    rng = np.random.default_rng(4)
    n = 2000
    pos = rng.random(n) < 0.3
    risks = {m: pos + rng.normal(0, 2.0, n) for m in BASELINES}
    risks["mahalanobis"] = pos + rng.normal(0, 0.5, n)  # the best peer on this task
    risks["msp"] = pos + rng.normal(0, 0.8, n)  # the calibration stream's choice
    risks["trust"] = pos + rng.normal(0, 1.0, n)
    risks["head_anomaly"] = risks["mahalanobis"] + 1e-3 * rng.normal(size=n)
    risks["head_misclassification"] = pos + rng.normal(0, 3.0, n)
    out = compare(risks, pos, resamples=200, seed=0, comparator="msp")
    assert out["best_peer"] == "mahalanobis" and out["comparator"] == "msp"
    assert out["comparator_from"] == "calibration stream"
    assert out["best_head"] == "head_anomaly"
    assert out["heads"]["head_anomaly"]["vs_comparator"] > 0.02
    assert abs(out["heads"]["head_anomaly"]["vs_best_peer"]) < 0.005
    assert out["p_head_behind"] < 0.01  # it does not trail msp
    assert compare(risks, pos, resamples=50, seed=0, comparator="nonesuch")["comparator"] \
        == "mahalanobis"


def _set(name: str, group: str, n: int, wrong_rate: float, rng: np.random.Generator,
         source: np.ndarray) -> EvalSet:
    wrong = rng.random(n) < wrong_rate
    trust = np.where(wrong, rng.uniform(0, 0.6, n), rng.uniform(0.4, 1, n))
    risks = {m: rng.random(n) for m in DETECTORS}
    labels = np.where(wrong, 1, 0)
    return EvalSet(name, group, name, _scores(n, trust, {}, risks), labels, True, source)


def test_compositions_follow_their_shares_and_summaries_adjust_across_mixes() -> None:
    rng = np.random.default_rng(5)
    sets = [_set("clean", "clean", 3000, 0.1, rng, np.arange(3000)),
            _set("blur", "corruption", 900, 0.3, rng, np.arange(900)),
            _set("pgd", "attack", 600, 1.0, rng, np.arange(600)),
            _set("noise", "foreign", 600, 1.0, rng, 10_000 + np.arange(600))]
    out = composition_sections(sets, 1000, resamples=100, seed=0)
    assert set(out) == set(COMPOSITIONS)
    c = out["clean_heavy"]["composition"]
    assert c == {"clean": 900, "corruption": 50, "attack": 30, "foreign": 20}
    assert out["attack_heavy"]["composition"]["attack"] == 500
    for sec in out.values():
        assert set(BASELINES) <= set(sec["trust_minus"])
        assert sec["trust"]["aurc"] < sec["msp"]["aurc"]  # trust ranks, the peers are noise
    rows = stream_summary({"mixed_compositions": out})
    assert [r["stream"] for r in rows] == [f"{k} composition" for k in COMPOSITIONS]
    raw = [r["p_not_lowest"] for r in rows]
    assert all(r["p_not_lowest_holm"] >= p for r, p in zip(rows, raw, strict=True))


def test_summary_table_adjusts_head_pvalues_across_tasks() -> None:
    rng = np.random.default_rng(6)
    n = 1500
    metrics: dict = {"shift": {}}
    pos = rng.random(n) < 0.3
    for i, noise in enumerate((0.5, 3.0)):
        risks = {m: pos + rng.normal(0, 1.0, n) for m in BASELINES}
        risks["trust"] = pos + rng.normal(0, 1.0, n)
        risks["head_anomaly"] = pos + rng.normal(0, noise, n)
        sec = compare(risks, pos, resamples=200, seed=i, comparator="knn")
        (metrics.setdefault("misclassification", sec) if i == 0
         else metrics["shift"].update(blur=sec))
    rows = summary_table(metrics)
    assert [r["task"] for r in rows] == ["misclassification (clean)",
                                         "wrong vs right under blur"]
    assert rows[0]["p_head_behind_holm"] < 0.05 < rows[1]["p_head_behind_holm"]
    assert rows[0]["p_head_behind_holm"] >= rows[0]["p_head_behind"]


def test_comparators_are_chosen_on_the_calibration_stream() -> None:
    rng = np.random.default_rng(7)
    groups = ["clean"] * 800 + ["corruption"] * 300 + ["attack"] * 300
    fams = ["clean"] * 800 + ["blur"] * 300 + ["pgd"] * 300
    n = len(groups)
    wrong = np.r_[rng.random(800) < 0.1, rng.random(300) < 0.4, np.ones(300, bool)]
    labels = np.where(wrong, 1, 0)
    b = Batch(np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32),
              np.zeros((n, 2), np.float32), labels, np.array(groups, object),
              np.array(fams, object))
    risks = {m: rng.random(n) for m in DETECTORS}
    familiar = np.isin(b.group, ["clean", "corruption"])
    risks["msp"] = np.where(familiar, wrong + rng.normal(0, 0.3, n), rng.random(n))
    risks["mahalanobis"] = np.where(b.group == "attack", 2.0, 0.0) + rng.random(n)
    comp = choose_comparators(b, risks)
    assert comp["clean"] == "msp" and comp["blur"] == "msp"
    assert comp["pgd"] == "mahalanobis" and comp["attack"] == "mahalanobis"
    assert comp["corruption"] == "msp" and set(comp.values()) <= set(BASELINES)
