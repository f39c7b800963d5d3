"""The calibration map of trust (conceptguard/trust.py applies it, conceptguard/trust_map.py
fits it) and the operating curve (conceptguard/operating_point.py): pure functions on
synthetic scores, and the map applied by the one scoring function on the demo bank's monitor
(fast: no bank build)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from conceptguard.bank import load_bank
from conceptguard.calibration import (
    MAP_CLEAN_SHARES,
    Batch,
    choose_map_share,
    cross_fitted_calibration,
    map_weights,
)
from conceptguard.metrics import aurc, auroc
from conceptguard.monitor_io import monitor_from_tensors, monitor_tensors
from conceptguard.operating_point import (
    COLUMNS,
    OperatingTarget,
    UnreachableTarget,
    curve_array,
    operating_curve,
    pick,
)
from conceptguard.scoring import IDENTITY, TrustMap, score
from conceptguard.trust_map import (
    SLOPE,
    check_knots,
    expected_calibration_error,
    fit_trust_map,
    pool_adjacent_violators,
)

EPS64 = np.finfo(np.float64).eps


def _miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores whose true P(right) is raw**3 (over-confident, like the raw trust)."""
    rng = np.random.default_rng(seed)
    raw = rng.random(n)
    return raw, rng.random(n) < raw ** 3


def test_pool_adjacent_violators_matches_a_brute_force_isotonic_fit() -> None:
    rng = np.random.default_rng(1)
    y, w = rng.random(9), rng.random(9) + 0.1
    starts, bw, bv = pool_adjacent_violators(y, w)
    assert (np.diff(bv) > 0).all()
    fitted = np.repeat(bv, np.diff(np.r_[starts, len(y)]))
    assert np.isclose(bw.sum(), w.sum(), rtol=16 * EPS64)
    # the weighted least-squares optimum among non-decreasing fits: no random monotone
    # candidate does better
    best = float((w * (y - fitted) ** 2).sum())
    for _ in range(2000):
        cand = np.sort(rng.random(9))
        assert (w * (y - cand) ** 2).sum() >= best - 1e-12 * max(best, 1.0)


def test_fitted_map_calibrates_and_keeps_the_ranking() -> None:
    raw, right = _miscalibrated(20_000, 0)
    m = fit_trust_map(raw, right)
    assert check_knots(m.x, m.y) is None
    test_raw, test_right = _miscalibrated(20_000, 1)  # held-out draw
    before = expected_calibration_error(test_raw, test_right)
    after = expected_calibration_error(m(test_raw), test_right)
    assert before > 0.15 and after < 0.02, (before, after)
    cal = m(test_raw)
    # strictly increasing: the order of every pair is kept, so ranking metrics are equal
    order = np.argsort(test_raw)
    assert (np.diff(cal[order]) > 0).all()
    assert auroc(-cal, test_right) == auroc(-test_raw, test_right)
    assert aurc(-cal, ~test_right) == aurc(-test_raw, ~test_right)


def test_equal_raw_scores_stay_equal_and_the_slope_never_vanishes() -> None:
    raw = np.r_[np.full(50, 0.3), np.full(50, 0.7), np.linspace(0, 1, 11)]
    right = np.r_[np.zeros(50, bool), np.ones(50, bool), np.ones(11, bool)]
    m = fit_trust_map(raw, right)
    assert np.unique(m(np.full(7, 0.3))).size == 1
    slopes = np.diff(m.y) / np.diff(m.x)
    assert slopes.min() >= SLOPE * (1 - 1e-9)
    assert m.y[0] >= 0 and m.y[-1] <= 1


def test_weights_count_as_repeated_inputs() -> None:
    raw = np.array([0.1, 0.2, 0.6, 0.9])
    right = np.array([False, True, False, True])
    w = np.array([1.0, 3.0, 2.0, 1.0])
    a = fit_trust_map(raw, right, w)
    b = fit_trust_map(np.repeat(raw, w.astype(int)), np.repeat(right, w.astype(int)))
    grid = np.linspace(0, 1, 101)
    np.testing.assert_allclose(a(grid), b(grid), rtol=0, atol=16 * EPS64)


def test_check_knots_names_each_problem() -> None:
    assert check_knots(IDENTITY.x, IDENTITY.y) is None
    assert "0 to 1" in check_knots(np.array([0.1, 1.0]), np.array([0.0, 1.0]))
    assert "strictly increasing" in check_knots(np.array([0.0, 0.5, 1.0]),
                                                np.array([0.0, 0.5, 0.5]))
    assert "finite" in check_knots(np.array([0.0, 1.0]), np.array([0.0, np.nan]))
    assert "[0, 1]" in check_knots(np.array([0.0, 1.0]), np.array([0.0, 1.5]))


def test_ece_is_zero_for_a_calibrated_bin_and_the_gap_otherwise() -> None:
    t = np.full(10, 0.65)
    assert expected_calibration_error(t, np.arange(10) < 7) == pytest.approx(
        0.05, rel=64 * EPS64)


# ---- the operating curve ----------------------------------------------------------------

def _curve(n: int = 4000) -> tuple[np.ndarray, dict]:
    raw, right = _miscalibrated(n, 3)
    correct_clean = right.copy()
    c = operating_curve(raw, ~right, np.ones(n), correct_clean, fit_trust_map(raw, right))
    return curve_array(c), c


def test_curve_columns_are_monotone_and_the_lowest_threshold_accepts_everything() -> None:
    rows, c = _curve()
    assert c["columns"] == list(COLUMNS) and len(rows) <= 256
    col = {n: i for i, n in enumerate(COLUMNS)}
    assert (np.diff(rows[:, col["threshold_raw"]]) > 0).all()
    assert (np.diff(rows[:, col["threshold"]]) > 0).all()
    assert (np.diff(rows[:, col["coverage"]]) <= 0).all()
    assert rows[0, col["coverage"]] == 1.0 and rows[0, col["accept_correct"]] == 1.0


def test_pick_meets_each_target_with_the_tightest_row() -> None:
    rows, _ = _curve()
    col = {n: i for i, n in enumerate(COLUMNS)}
    got = pick(rows, OperatingTarget(target="coverage", value=0.6))
    assert got["coverage"] >= 0.6
    above = rows[rows[:, 0] > got["threshold_raw"]]
    assert (above[:, col["coverage"]] < 0.6).all()  # a higher threshold would miss it
    got = pick(rows, OperatingTarget.parse("risk:0.3"))
    assert got["weighted_risk"] <= 0.3
    below = rows[rows[:, 0] < got["threshold_raw"]]
    assert (below[:, col["weighted_risk"]] > 0.3).all()  # the largest coverage that meets it


def test_unreachable_and_malformed_targets_are_refused_with_the_reason() -> None:
    raw = np.linspace(0, 1, 2000)
    right = raw > 0.5
    right[-5:] = False  # the most trusted inputs are wrong: no threshold has zero risk
    rows = curve_array(operating_curve(raw, ~right, np.ones(2000), right, IDENTITY))
    with pytest.raises(UnreachableTarget, match="risk 1e-06 is unreachable"):
        pick(rows, OperatingTarget(target="risk", value=1e-6))
    with pytest.raises(ValueError, match="TARGET:VALUE"):
        OperatingTarget.parse("0.9")
    with pytest.raises(ValueError):
        OperatingTarget.parse("coverage:1.5")
    with pytest.raises(ValueError):
        OperatingTarget.parse("speed:0.5")
    with pytest.raises(ValueError, match="columns"):
        curve_array({"columns": ["x"], "rows": [[1.0]]})


# ---- the map in the bank and in score() --------------------------------------------------

@pytest.fixture(scope="module")
def demo_outputs(demo_bank_path: Path):
    bank = load_bank(demo_bank_path)
    rng = np.random.default_rng(0)
    d = bank.manifest.dims
    # the detectors' own statistics give plausible inputs: class means plus noise
    means = bank.tensors["detector.mahalanobis.means"].astype(np.float64)
    cls = rng.integers(0, d.classes, 400)
    feats = means[cls] + rng.normal(0, 1.0, (400, d.features)) * means.std() * 0.1
    w = bank.tensors["detector.react_energy.weight"].astype(np.float64)
    logits = feats @ w.T + bank.tensors["detector.react_energy.bias"]
    concepts = rng.normal(0, 1, (400, d.concepts))
    return bank, logits, feats, concepts


def test_old_bank_loads_with_the_identity_map(demo_outputs, demo_bank_path: Path,
                                               tmp_path: Path) -> None:
    import shutil

    from tests.fixtures_bank import as_schema2

    new = demo_outputs[0]
    old = load_bank(as_schema2(shutil.copytree(demo_bank_path, tmp_path / "old")))
    assert old.manifest.schema_version == 2
    assert old.monitor.calibration.is_identity
    assert old.monitor.calibrated_threshold == old.monitor.threshold == new.monitor.threshold
    # the same decisions as the bank with its map; trust is the raw score
    _, logits, feats, concepts = demo_outputs
    a, b = (score(x.monitor, logits, feats, concepts) for x in (old, new))
    np.testing.assert_array_equal(a.reject, b.reject)
    np.testing.assert_array_equal(a.trust, b.raw_trust)


def test_score_applies_the_map_and_keeps_every_decision(demo_outputs) -> None:
    bank, logits, feats, concepts = demo_outputs
    base = dataclasses.replace(bank.monitor, calibration=IDENTITY)
    ref = score(base, logits, feats, concepts)
    wrong = np.random.default_rng(5).random(len(ref)) < 1 - ref.trust ** 2
    mapped = dataclasses.replace(base, calibration=fit_trust_map(ref.trust, ~wrong))
    got = score(mapped, logits, feats, concepts)
    np.testing.assert_array_equal(got.raw_trust, ref.trust)
    np.testing.assert_array_equal(got.trust, mapped.calibration(ref.trust))
    np.testing.assert_array_equal(got.reject, ref.reject)
    assert got.reason == ref.reason
    assert ((got.trust < mapped.calibrated_threshold) == got.reject).all()
    assert auroc(1 - got.trust, wrong) == auroc(1 - ref.trust, wrong)
    # through the bank's tensors and back: the same map
    back = monitor_from_tensors(monitor_tensors(mapped), mapped.threshold)
    np.testing.assert_array_equal(back.calibration.x, mapped.calibration.x)
    np.testing.assert_array_equal(back.calibration.y, mapped.calibration.y)
    t = monitor_tensors(mapped)
    t.pop("trust.calibration.y")
    with pytest.raises(ValueError, match="without its partner"):
        monitor_from_tensors(t, mapped.threshold)
    t = monitor_tensors(mapped)
    t["trust.calibration.y"] = t["trust.calibration.y"][::-1].copy()
    with pytest.raises(ValueError, match="strictly increasing"):
        monitor_from_tensors(t, mapped.threshold)


def test_identity_map_is_the_default() -> None:
    assert TrustMap(np.array([0.0, 1.0]), np.array([0.0, 1.0])).is_identity
    np.testing.assert_array_equal(IDENTITY(np.array([0.2, 0.9])), [0.2, 0.9])


def _stream_with_hidden_errors(n: int, seed: int) -> tuple[Batch, np.ndarray, np.ndarray]:
    """A stream whose clean inputs are right with P = raw (the raw score is calibrated on
    them) and whose attacked inputs share the raw scores of clean ones but are always
    wrong: one map cannot be exact on both."""
    rng = np.random.default_rng(seed)
    raw = rng.random(2 * n)
    group = np.array(["clean"] * n + ["attack"] * n, dtype=object)
    right = np.r_[rng.random(n) < raw[:n], np.zeros(n, bool)]
    labels = np.zeros(2 * n, np.int64)
    logits = np.where(right[:, None], [[1.0, 0.0]], [[0.0, 1.0]])
    empty = np.zeros((2 * n, 1))
    stream = Batch(logits, empty, empty, labels, group, group.copy(),
                   np.arange(2 * n, dtype=np.int64))
    weights = np.where(group == "clean", 0.5 / n, 0.5 / n)
    return stream, raw, weights


def test_map_weights_blend_the_stream_with_clean_inputs_alone() -> None:
    stream, _, weights = _stream_with_hidden_errors(100, 0)
    clean = stream.group == "clean"
    for share in MAP_CLEAN_SHARES:
        w = map_weights(stream, weights, share)
        assert w.sum() == pytest.approx(1.0, rel=1e-12)
        # clean inputs hold their stream share (0.5) plus the clean share of the rest
        assert w[clean].sum() == pytest.approx(0.5 + 0.5 * share, rel=1e-12)
    assert np.all(map_weights(stream, weights, 1.0)[~clean] == 0.0)


def test_the_map_share_is_chosen_for_the_smaller_worse_ece() -> None:
    stream, raw, weights = _stream_with_hidden_errors(3000, 1)
    share, table, _ = choose_map_share(raw, stream, weights, folds=5, seed=0)
    worst = {float(k): max(v.values()) for k, v in table.items()}
    assert worst[share] == min(worst.values())
    assert share > 0.0  # the stream-only map under-states P(right) on clean inputs
    assert table[f"{share:g}"]["ece_clean"] < table["0"]["ece_clean"]
    right = ~stream.wrong
    clean = stream.group == "clean"
    cal = cross_fitted_calibration(raw, stream, map_weights(stream, weights, share), 5, 0)
    assert expected_calibration_error(cal[clean], right[clean]) == pytest.approx(
        table[f"{share:g}"]["ece_clean"], abs=1e-4)  # the table's figures, rounded to 4
