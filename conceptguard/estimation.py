"""How well ``trust`` reads as P(right), measured on held-out streams: ECE per traffic kind,
the estimated accuracy of a stream (mean trust) against its realised accuracy, and the
reject target checked on the test split with a bootstrap interval. Pure functions; the
offline evaluation feeds them (:mod:`offline.evaluate`)."""

from __future__ import annotations

import numpy as np

from conceptguard.metrics import bootstrap_blocks, interval
from conceptguard.trust_map import expected_calibration_error


def _r(x: float) -> float:
    return round(float(x), 4)


def ece_entry(trust: np.ndarray, right: np.ndarray, raw_trust: np.ndarray | None) -> dict:
    """ECE of calibrated trust (and of the raw score where it is known) on one kind."""
    out = {"calibrated": _r(expected_calibration_error(trust, right)), "n": int(len(trust))}
    if raw_trust is not None:
        out["raw"] = _r(expected_calibration_error(raw_trust, right))
    return out


def estimated_accuracy(trust: np.ndarray, right: np.ndarray,
                       raw_trust: np.ndarray | None = None) -> dict:
    """A stream's estimated accuracy (mean calibrated trust), its realised accuracy and the
    error (estimated - realised); the raw score's mean beside it where known."""
    est, real = float(np.mean(trust)), float(np.mean(right))
    out = {"n": int(len(trust)), "realised": _r(real), "estimated": _r(est),
           "error": _r(est - real)}
    if raw_trust is not None:
        out["estimated_raw"] = _r(np.mean(raw_trust))
        out["error_raw"] = _r(np.mean(raw_trust) - real)
    return out


def reject_target_check(target: str, value: float, accepted: np.ndarray, wrong: np.ndarray,
                        correct_clean: np.ndarray, weights: np.ndarray, *, resamples: int,
                        seed: int) -> dict:
    """The bank's reject target measured on held-out inputs, with a 95% bootstrap interval.
    ``accept_correct``: the share of ``correct_clean`` inputs accepted (at least ``value``);
    ``max_risk``: the weighted error rate among accepted inputs (at most ``value``;
    ``weights``: the fitting stream's kind shares applied to the held-out sets)."""
    accepted = np.asarray(accepted, bool)
    if target == "accept_correct":
        rows = np.flatnonzero(correct_clean)
        x = accepted[rows].astype(np.float64)
        point = float(x.mean()) if len(x) else float("nan")
        samples = np.concatenate([(c @ x) / max(len(x), 1)
                                  for c in bootstrap_blocks(len(x), resamples, seed)])
        met, n = point >= value, len(x)
        what = "share of correct clean test predictions accepted"
    else:
        w = np.asarray(weights, np.float64)
        num, den = w * accepted * np.asarray(wrong, np.float64), w * accepted
        point = float(num.sum() / max(den.sum(), 1e-12))
        samples = np.concatenate([(c @ num) / np.maximum(c @ den, 1e-12)
                                  for c in bootstrap_blocks(len(w), resamples, seed)])
        met, n = point <= value, len(w)
        what = "weighted error rate among accepted held-out inputs"
    lo, hi = interval(samples)
    return {"target": target, "target_value": value, "measured": _r(point), "what": what,
            "ci95": [_r(lo), _r(hi)], "met": bool(met),
            "target_inside_ci95": bool(lo <= value <= hi), "n": int(n)}
