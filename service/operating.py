"""The serve-time operating point: the reject threshold chosen from the bank's stored
operating curve for a coverage or risk target (``CONCEPTGUARD_OPERATING_POINT`` or
``PUT /v1/admin/operating-point``), without a rebuild.

The chosen point replaces the monitor's threshold in a new :class:`Loaded` (the bank's
tensors, runtime and metrics are shared), swapped in like a reload: a request holds one
threshold for its whole life. The calibration map is unchanged, so the threshold shown on
the calibrated scale is the map of the raw one.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import numpy as np

from conceptguard.bank import Bank
from conceptguard.operating_point import OperatingTarget, UnreachableTarget, curve_array, pick
from service.metrics import EXPECTED_REJECTION_RATE, REJECT_THRESHOLD

BANK_TARGET = "bank"  # the metric's target label for the bank's own threshold


class NoOperatingCurve(ValueError):
    """The bank stores no operating curve (built before schema version 3)."""


def bank_curve(bank: Bank) -> np.ndarray:
    curve = bank.manifest.calibration.get("operating_curve")
    if curve is None:
        raise NoOperatingCurve(
            f"bank {bank.manifest.bank_id} has no operating curve (schema version "
            f"{bank.manifest.schema_version}; curves are stored from version 3): rebuild it "
            "with this version to choose an operating point")
    try:
        return curve_array(curve)
    except ValueError as exc:
        raise NoOperatingCurve(f"bank {bank.manifest.bank_id}: {exc}") from exc


def choose(bank: Bank, target: OperatingTarget) -> dict[str, Any]:
    """The point of the bank's curve for ``target``: :class:`NoOperatingCurve` or
    :class:`UnreachableTarget` (both ValueError) when there is none."""
    row = pick(bank_curve(bank), target)
    return {"target": target.target, "value": target.value,
            "threshold": row["threshold"], "threshold_raw": row["threshold_raw"],
            "expected": {k: row[k] for k in ("accept_correct", "weighted_risk", "coverage")},
            "from": "the bank's operating curve (out-of-fold trust of the fitting stream)"}


def with_operating_point(loaded, target: OperatingTarget | None):
    """``loaded`` serving the threshold chosen for ``target`` (None: the bank's own)."""
    if target is None:
        point = None
        monitor = dataclasses.replace(loaded.bank.monitor,
                                      threshold=_bank_raw_threshold(loaded.bank))
    else:
        point = choose(loaded.bank, target)
        monitor = dataclasses.replace(loaded.bank.monitor, threshold=point["threshold_raw"])
    bank = dataclasses.replace(loaded.bank, monitor=monitor)
    return dataclasses.replace(loaded, bank=bank, operating_point=point, _cache={},
                               _head_lock=threading.Lock())


def _bank_raw_threshold(bank: Bank) -> float:
    from conceptguard.bank import raw_threshold

    return raw_threshold(bank.manifest)


def threshold_view(loaded) -> dict[str, Any]:
    """``GET /v1/bank``'s ``threshold``: the one in use (calibrated scale: ``value``; the
    trust model's own: ``raw``), where it comes from, and the bank's own."""
    m = loaded.bank.monitor
    point = getattr(loaded, "operating_point", None)
    out: dict[str, Any] = {**loaded.bank.manifest.threshold,
                           "value": m.calibrated_threshold, "raw": m.threshold}
    if point is None:
        out["source"] = BANK_TARGET
    else:
        out.update(source="operating point", operating_point=point,
                   bank=loaded.bank.manifest.threshold)
    return out


_published: dict[str, str] = {}  # model -> the target label its gauge series carries
_expected: set[str] = set()  # models whose expected-rate series exists
_lock = threading.Lock()


def publish_threshold(loaded) -> None:
    """``conceptguard_reject_threshold{model, target}``: the threshold in use (calibrated
    scale); a series of a target no longer in use is set to NaN and removed. And
    ``conceptguard_expected_rejection_rate{model}``: the share of clean test inputs the
    bank's own threshold rejects while that threshold is in use, NaN while an operating
    point is (the bank measured no clean rate there: the alert baseline then comes from
    traffic only)."""
    point = getattr(loaded, "operating_point", None)
    label = BANK_TARGET if point is None else f"{point['target']}:{point['value']:g}"
    model = loaded.model_name
    expected = loaded.metrics.expected_rejection_rate if point is None else None
    with _lock:
        old = _published.get(model)
        if old is not None and old != label:
            REJECT_THRESHOLD.labels(model, old).set(math.nan)
            REJECT_THRESHOLD.remove(model, old)
        REJECT_THRESHOLD.labels(model, label).set(loaded.bank.monitor.calibrated_threshold)
        _published[model] = label
        if expected is not None:
            EXPECTED_REJECTION_RATE.labels(model).set(expected)
            _expected.add(model)
        elif model in _expected:
            EXPECTED_REJECTION_RATE.labels(model).set(math.nan)


def retire_model(model: str) -> None:
    """A model no longer served (a reload to a bank of another name): its threshold and
    expected-rate series are set to NaN and removed (in multiprocess mode they read NaN)."""
    with _lock:
        old = _published.pop(model, None)
        if old is not None:
            REJECT_THRESHOLD.labels(model, old).set(math.nan)
            REJECT_THRESHOLD.remove(model, old)
        if model in _expected:
            _expected.discard(model)
            EXPECTED_REJECTION_RATE.labels(model).set(math.nan)
            EXPECTED_REJECTION_RATE.remove(model)


__all__ = ["NoOperatingCurve", "OperatingTarget", "UnreachableTarget", "choose",
           "publish_threshold", "retire_model", "threshold_view", "with_operating_point"]
