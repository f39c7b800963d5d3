"""The monitor as bank tensors and back: ``detector.<name>.<key>`` (each detector's fitted
state), ``trust.knots``, ``trust.<head>.{mean,scale,w,b}`` and the calibration map's knots
``trust.calibration.{x,y}`` (float64; optional: a bank written before the map existed gets
the identity)."""

from __future__ import annotations

import numpy as np

from conceptguard.detectors import detectors_from_state, detectors_state
from conceptguard.heads import LogisticHead
from conceptguard.scoring import IDENTITY, Monitor, TrustMap
from conceptguard.trust import HEADS, HINGE_QUANTILES, HINGED, TrustModel, feature_names
from conceptguard.trust_map import check_knots

CALIBRATION_KEYS = ("trust.calibration.x", "trust.calibration.y")


def monitor_tensors(monitor: Monitor) -> dict[str, np.ndarray]:
    out = detectors_state(monitor.detectors)
    out["trust.knots"] = monitor.trust_model.knots
    out["trust.misclassification.columns"] = monitor.trust_model.mis_columns.astype(np.float32)
    for key, head in monitor.trust_model.heads.items():
        out[f"trust.{key}.mean"] = head.mean
        out[f"trust.{key}.scale"] = head.scale
        out[f"trust.{key}.w"] = head.w
        out[f"trust.{key}.b"] = np.array([head.b])
    out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
    # float64: the knots' y must stay strictly increasing (float32 could merge close ones)
    out["trust.calibration.x"] = np.ascontiguousarray(monitor.calibration.x, np.float64)
    out["trust.calibration.y"] = np.ascontiguousarray(monitor.calibration.y, np.float64)
    return out


def calibration_from_tensors(t: dict[str, np.ndarray]) -> TrustMap:
    """The stored map, or the identity when the bank has none; ValueError when the knots
    are not a valid map."""
    present = [k for k in CALIBRATION_KEYS if k in t]
    if not present:
        return IDENTITY
    if len(present) == 1:
        raise ValueError(f"{present[0]} is stored without its partner")
    x, y = (np.asarray(t[k], np.float64) for k in CALIBRATION_KEYS)
    problem = check_knots(x, y)
    if problem:
        raise ValueError(f"trust.calibration: {problem}")
    return TrustMap(x, y)


def monitor_from_tensors(t: dict[str, np.ndarray], threshold: float) -> Monitor:
    def head(key: str) -> LogisticHead:
        return LogisticHead(t[f"trust.{key}.mean"].astype(np.float64),
                            t[f"trust.{key}.scale"].astype(np.float64),
                            t[f"trust.{key}.w"].astype(np.float64),
                            float(t[f"trust.{key}.b"][0]))

    cols = t["trust.misclassification.columns"] > 0.5
    heads = {h: head(h) for h in HEADS}
    if len(heads["misclassification"].w) != int(cols.sum()):
        raise ValueError("trust.misclassification.w does not match its column mask")
    model = TrustModel(t["trust.knots"].astype(np.float64), heads, cols)
    return Monitor(detectors_from_state(t), model, float(threshold),
                   calibration_from_tensors(t))


def monitor_shapes(classes: int, concepts: int, features: int) -> dict[str, tuple[int, ...]]:
    """The shapes of the monitor's tensors that follow from the bank's dimensions (the
    detectors' own tensors are checked when they are built)."""
    n_all = len(feature_names())
    shapes: dict[str, tuple[int, ...]] = {"trust.knots": (len(HINGED), len(HINGE_QUANTILES)),
                                          "trust.misclassification.columns": (n_all,)}
    for h in HEADS:
        if h != "misclassification":  # its width follows its column mask (checked on load)
            for part in ("mean", "scale", "w"):
                shapes[f"trust.{h}.{part}"] = (n_all,)
        shapes[f"trust.{h}.b"] = (1,)
    c, k, f = classes, concepts, features
    shapes.update({
        "detector.mahalanobis.means": (c, f), "detector.mahalanobis.whiten": (f, f),
        "detector.concept_mahalanobis.means": (c, k),
        "detector.concept_mahalanobis.whiten": (k, k),
        "detector.vim.origin": (f,), "detector.react_energy.weight": (c, f),
        "detector.react_energy.bias": (c,),
    })
    for name in ("paper_rule", "heatmap_cosine"):
        for h in ("h_ok", "h_bad", "h_adv"):
            shapes[f"detector.{name}.{h}"] = (c, k)
    return shapes
