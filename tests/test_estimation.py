"""Estimated accuracy, ECE per kind and the held-out reject-target check
(conceptguard/estimation.py), and NannyML's CBPE beside them (offline/cbpe.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conceptguard.estimation import ece_entry, estimated_accuracy, reject_target_check
from offline.cbpe import cbpe_accuracy, nannyml_version

EPS64 = np.finfo(np.float64).eps


def test_estimated_accuracy_is_mean_trust_against_the_share_right() -> None:
    trust = np.array([0.9, 0.8, 0.4, 0.1])
    right = np.array([True, True, False, False])
    out = estimated_accuracy(trust, right, raw_trust=trust / 2)
    assert out == {"n": 4, "realised": 0.5, "estimated": 0.55, "error": 0.05,
                   "estimated_raw": 0.275, "error_raw": -0.225}
    # one input per bin: gaps 0.1, 0.2, 0.4, 0.1
    assert ece_entry(trust, right, None)["calibrated"] == pytest.approx(0.2, rel=64 * EPS64)


def test_accept_correct_check_has_an_interval_around_the_measured_share() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    correct_clean = np.ones(n, bool)
    accepted = rng.random(n) < 0.95
    out = reject_target_check("accept_correct", 0.95, accepted, ~correct_clean,
                              correct_clean, np.ones(n), resamples=200, seed=0)
    share = accepted.mean()
    assert out["measured"] == round(share, 4)
    lo, hi = out["ci95"]
    assert lo < share < hi and hi - lo < 0.03  # binomial sd ~0.005: the interval ~0.02
    assert out["met"] == (share >= 0.95) and out["n"] == n


def test_max_risk_check_weights_the_error_among_accepted_inputs() -> None:
    accepted = np.array([True, True, True, False])
    wrong = np.array([False, True, False, True])
    weights = np.array([1.0, 3.0, 1.0, 5.0])
    out = reject_target_check("max_risk", 0.5, accepted, wrong, np.zeros(4, bool), weights,
                              resamples=50, seed=1)
    assert out["measured"] == 0.6 and not out["met"]  # 3 / (1 + 3 + 1)


@pytest.mark.slow  # importing nannyml takes 10-20 s
def test_cbpe_says_when_nannyml_is_missing_or_estimates_a_calibrated_stream() -> None:
    rng = np.random.default_rng(0)

    def stream(n: int) -> tuple[np.ndarray, np.ndarray]:
        logits = rng.normal(0, 2, (n, 3))
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        labels = np.array([rng.choice(3, p=row) for row in p])  # calibrated by construction
        return p, labels

    ref_p, ref_y = stream(3000)
    test_p, test_y = stream(2000)
    out = cbpe_accuracy(ref_p, ref_y, {"test": test_p})
    if nannyml_version() is None:
        assert "nannyml is not installed" in out["unavailable"]
        return
    realised = float((test_p.argmax(1) == test_y).mean())
    assert abs(out["estimates"]["test"] - realised) < 0.04  # sampling sd ~0.01


def test_report_section_shows_ece_target_and_estimates(tmp_path) -> None:
    from offline.report_calibration import FIGURE, calibration_html, estimation_png

    sec = {
        "ece": {"clean": {"calibrated": 0.0123, "raw": 0.0987, "n": 300},
                "fitting_stream": {"calibrated": 0.02, "raw": 0.03, "n": 700},
                "fitting_stream_by_kind": {"clean": {"calibrated": 0.01}}},
        "ece_bins": 10,
        "reject_target_heldout": {"target": "accept_correct", "target_value": 0.95,
                                  "measured": 0.9512, "what": "share accepted",
                                  "ci95": [0.94, 0.96], "met": True, "n": 200},
        "estimated_accuracy": {
            "clean": {"kind": "clean", "n": 300, "realised": 0.9, "estimated": 0.8876,
                      "error": -0.0124, "cbpe": 0.9111, "cbpe_error": 0.0111},
            "foreign/digits": {"kind": "foreign", "n": 80, "realised": 0.0,
                               "estimated": 0.2, "error": 0.2}},
        "cbpe": {"version": "0.13.1", "fitted_on": "the calibration split"},
        "note": "a note",
    }
    selection = {"0": {"ece_clean": 0.0567, "ece_stream": 0.0069},
                 "0.5": {"ece_clean": 0.0304, "ece_stream": 0.0323}}
    page = calibration_html({"trust_calibration": sec, "calibration": {
        "trust_map": {"clean_share": 0.5, "clean_share_selection": selection}}})
    for text in ("0.0123", "0.0987", "0.9512", "0.9400 to 0.9600", "met", "0.8876",
                 "0.9111", "NannyML 0.13.1", "foreign/digits", FIGURE, "clean share 0.5",
                 "0.0567", "0.0323"):
        assert text in page, text
    assert "clean share" not in calibration_html({"trust_calibration": sec})  # older banks
    assert calibration_html({}) == ""
    estimation_png(sec, tmp_path / FIGURE)
    assert (tmp_path / FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
