"""The operating curve a bank stores, and the reject threshold for a target read from it.

At build time the calibration stage records, from the out-of-fold trust of the weighted
fitting stream, at up to :data:`CURVE_POINTS` thresholds: the threshold (raw, and
calibrated through the bank's map), the share of correct clean predictions accepted
(``accept_correct``), the weighted error rate among accepted inputs (``weighted_risk``) and
the weighted share of inputs accepted (``coverage``). The service picks a threshold from it
for an operator's target (:func:`pick`) without a rebuild.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from conceptguard.scoring import TrustMap

CURVE_POINTS = 256
COLUMNS: tuple[str, ...] = ("threshold_raw", "threshold", "accept_correct", "weighted_risk",
                            "coverage")
Target = Literal["coverage", "accept_correct", "risk"]


class OperatingTarget(BaseModel):
    """``coverage``: accept at least ``value`` of the (weighted) fitting stream;
    ``accept_correct``: accept at least ``value`` of the correct clean predictions;
    ``risk``: the largest coverage whose weighted error rate among accepted inputs is at
    most ``value``."""

    model_config = ConfigDict(extra="forbid")

    target: Target
    value: float = Field(gt=0.0, lt=1.0, strict=True)  # a JSON number, not "0.9" or true

    @classmethod
    def parse(cls, text: str) -> OperatingTarget:
        """``"coverage:0.9"``, ``"risk:0.05"`` or ``"accept_correct:0.95"``."""
        target, sep, value = text.partition(":")
        if not sep:
            raise ValueError("must be TARGET:VALUE, e.g. coverage:0.9 or risk:0.05")
        try:
            number = float(value)
        except ValueError as exc:
            raise ValueError(f"value {value!r} is not a number") from exc
        return cls(target=target.strip(), value=number)  # type: ignore[arg-type]


class UnreachableTarget(ValueError):
    """The stored curve holds no threshold that meets the target."""


def operating_curve(raw: np.ndarray, bad: np.ndarray, weights: np.ndarray,
                    correct_clean: np.ndarray, calibration: TrustMap,
                    points: int = CURVE_POINTS, include: tuple[float, ...] = ()) -> dict:
    """The curve (see the module doc) at up to ``points`` thresholds: the stream's distinct
    raw scores at evenly spaced ranks, the lowest always included (it accepts everything),
    plus the thresholds in ``include`` (the build's own). Rows ascend in threshold."""
    raw = np.asarray(raw, np.float64)
    w = np.asarray(weights, np.float64)
    bad = np.asarray(bad, bool)
    distinct = np.unique(raw)
    pick = np.unique(np.linspace(0, len(distinct) - 1, min(points, len(distinct)))
                     .round().astype(np.int64))
    thresholds = np.union1d(distinct[pick], np.asarray(include, np.float64))
    accepted = raw[None, :] >= thresholds[:, None]  # (points, N)
    wa = (accepted * w).sum(1)
    risk = (accepted * (w * bad)).sum(1) / np.maximum(wa, 1e-12)
    coverage = wa / max(w.sum(), 1e-12)
    n_cc = max(int(correct_clean.sum()), 1)
    accept_correct = accepted[:, correct_clean].sum(1) / n_cc
    # thresholds at full precision (the build's own must be found again), figures at 7 digits
    rows = np.stack([thresholds, calibration(thresholds),
                     *(np.round(c, 7) for c in (accept_correct, risk, coverage))], 1)
    return {"columns": list(COLUMNS), "rows": rows.tolist(),
            "from": "out-of-fold trust of the weighted fitting stream"}


def curve_array(curve: object) -> np.ndarray:
    """A stored curve as an ``(M, len(COLUMNS))`` array; ValueError when malformed."""
    if not isinstance(curve, dict) or list(curve.get("columns", [])) != list(COLUMNS):
        raise ValueError(f"the operating curve must have columns {list(COLUMNS)}")
    rows = np.asarray(curve.get("rows"), dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != len(COLUMNS) or len(rows) == 0:
        raise ValueError("the operating curve has no rows or rows of the wrong width")
    if not np.isfinite(rows).all():
        raise ValueError("the operating curve holds non-finite values")
    return rows


def pick(curve: np.ndarray, target: OperatingTarget) -> dict[str, float]:
    """The curve's row for ``target`` (as a dict of :data:`COLUMNS`): for a coverage target
    the highest threshold that still accepts at least ``value``; for a risk target the
    lowest threshold (largest coverage) whose risk is at most ``value``.
    :class:`UnreachableTarget` names the reachable range when no row qualifies."""
    col = {n: i for i, n in enumerate(COLUMNS)}
    if target.target == "risk":
        risk = curve[:, col["weighted_risk"]]
        ok = np.flatnonzero(risk <= target.value)
        if len(ok) == 0:
            raise UnreachableTarget(
                f"risk {target.value:g} is unreachable: the bank's curve goes down to a "
                f"weighted risk of {risk.min():.4g} at best")
        row = curve[ok[0]]
    else:
        cov = curve[:, col[target.target]]
        ok = np.flatnonzero(cov >= target.value)
        if len(ok) == 0:
            raise UnreachableTarget(
                f"{target.target} {target.value:g} is unreachable: the bank's curve reaches "
                f"{cov.max():.4g} at most")
        row = curve[ok[-1]]
    return {n: float(row[i]) for n, i in col.items()}
