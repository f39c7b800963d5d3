"""Fitting the calibration map of ``trust`` (:class:`conceptguard.scoring.TrustMap`, applied
by the one scoring function): a strictly increasing piecewise-linear function of the trust
model's raw score, fitted after the ranking so that ``trust`` reads as P(right).

The fit: weighted isotonic regression (pool adjacent violators) of "the prediction is right"
on the raw out-of-fold trust of the fitting stream; one knot per pooled block at the block's
weighted mean raw score, holding the block's weighted share of right predictions; the ends
held flat out to 0 and 1. That function is non-decreasing; the stored map is
``(1 - SLOPE) * it + SLOPE * raw``, strictly increasing on [0, 1], so the map keeps the order
of every pair of raw scores (and equal scores stay equal): rankings, AUROC, AURC and every
reject decision are those of the raw score. An identity map (knots (0, 0) and (1, 1)) is
what a bank written without one gets.
"""

from __future__ import annotations

import numpy as np

from conceptguard.scoring import IDENTITY, TrustMap

SLOPE = 1e-3  # the identity's share: the least slope of the map anywhere on [0, 1]


def check_knots(x: np.ndarray, y: np.ndarray) -> str | None:
    """None when ``(x, y)`` is a valid map, else what is wrong (for the bank's loader)."""
    if x.ndim != 1 or y.shape != x.shape or len(x) < 2:
        return f"knots must be two 1-D arrays of one length >= 2, got {x.shape} and {y.shape}"
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return "knots must be finite"
    if x[0] != 0.0 or x[-1] != 1.0:
        return f"x knots must run from 0 to 1, got {x[0]:g} to {x[-1]:g}"
    if not (np.diff(x) > 0).all() or not (np.diff(y) > 0).all():
        return "knots must be strictly increasing in x and y"
    if y[0] < 0.0 or y[-1] > 1.0:
        return f"y knots must lie in [0, 1], got {y[0]:g} to {y[-1]:g}"
    return None


def pool_adjacent_violators(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                     np.ndarray]:
    """Weighted isotonic (non-decreasing) regression of ``y`` in the given order. Returns
    each pooled block's start index, weight and value; block values strictly increase."""
    starts: list[int] = []
    weights: list[float] = []
    values: list[float] = []
    for i, (yi, wi) in enumerate(zip(y.tolist(), w.tolist(), strict=True)):
        starts.append(i)
        weights.append(wi)
        values.append(yi)
        while len(values) > 1 and values[-2] >= values[-1]:
            wsum = weights[-2] + weights[-1]
            v = (values[-2] * weights[-2] + values[-1] * weights[-1]) / wsum
            starts.pop()
            weights.pop()
            values.pop()
            weights[-1], values[-1] = wsum, v
    return np.array(starts, np.int64), np.array(weights), np.array(values)


def fit_trust_map(raw: np.ndarray, right: np.ndarray, weights: np.ndarray | None = None
                  ) -> TrustMap:
    """The map of raw scores ``raw`` (in [0, 1]) to the weighted share of ``right``
    predictions (see the module doc)."""
    raw = np.clip(np.asarray(raw, np.float64), 0.0, 1.0)
    right = np.asarray(right, np.float64)
    w = np.ones(len(raw)) if weights is None else np.asarray(weights, np.float64)
    keep = w > 0
    raw, right, w = raw[keep], right[keep], w[keep]
    if len(raw) == 0:
        return IDENTITY
    # equal raw scores are one point (so they get one value)
    xs, inverse = np.unique(raw, return_inverse=True)
    wx = np.bincount(inverse, weights=w)
    yx = np.bincount(inverse, weights=w * right) / wx
    starts, _, bv = pool_adjacent_violators(yx, wx)
    ends = np.r_[starts[1:], len(xs)]
    centre = np.array([np.average(xs[s:e], weights=wx[s:e])
                       for s, e in zip(starts.tolist(), ends.tolist(), strict=True)])
    kx, ky = centre, bv
    if kx[0] > 0.0:
        kx, ky = np.r_[0.0, kx], np.r_[ky[0], ky]
    if kx[-1] < 1.0:
        kx, ky = np.r_[kx, 1.0], np.r_[ky, ky[-1]]
    y = (1.0 - SLOPE) * np.clip(ky, 0.0, 1.0) + SLOPE * kx
    return TrustMap(kx, y)


def expected_calibration_error(trust: np.ndarray, right: np.ndarray,
                               weights: np.ndarray | None = None, bins: int = 10) -> float:
    """ECE: the (weighted) mean over equal-width bins of trust of |share right - mean
    trust|, each bin weighted by its share of inputs (the report's reliability diagram)."""
    t = np.clip(np.asarray(trust, np.float64), 0.0, 1.0)
    y = np.asarray(right, np.float64)
    w = np.ones(len(t)) if weights is None else np.asarray(weights, np.float64)
    if len(t) == 0 or w.sum() <= 0:
        return float("nan")
    idx = np.minimum((t * bins).astype(np.int64), bins - 1)
    wb = np.bincount(idx, weights=w, minlength=bins)
    gap = np.bincount(idx, weights=w * (y - t), minlength=bins)
    return float(np.abs(gap).sum() / wb.sum())
