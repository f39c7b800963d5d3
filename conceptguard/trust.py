"""The trust model: detector risks -> P(prediction is right), and the reason for a reject.

``trust = (1 - p_misclassification) * (1 - p_anomaly)``:

- ``p_misclassification``: a logistic head on the *confidence* detectors (max softmax,
  max logit, energy, entropy, DOCTOR), optionally with the density hinges below, fitted on
  clean and corrupted inputs: the chance that a familiar-looking input is misclassified.
- ``p_anomaly``: a logistic head on every detector's feature plus hinge terms
  ``max(0, f - q)`` of the density detectors at the reference split's 50/90/99% quantiles
  ``q``: the chance of a wrong prediction caused by an attack or a foreign input (or, as a
  variant, by any input that is not clean). The hinges are zero for typical inputs, so the
  factor stays flat where density carries no evidence.

Which variant a bank uses is chosen on the calibration stream by leave-one-family-out
(:func:`conceptguard.calibration.select_variant`).

Two kind heads on the same features explain a reject: ``p_adversarial`` (a successful
attack) and ``p_unfamiliar`` (a corrupted/shifted or foreign input). The reason is named by
the head that carries the evidence (:func:`reasons`): ``misclassification-like`` where
``p_misclassification >= p_anomaly``, else the larger kind head's kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from conceptguard.detectors import DETECTORS
from conceptguard.heads import LogisticHead, sigmoid

SLOPE = 1e-3  # the identity's share: the least slope of the map anywhere on [0, 1]


@dataclass(frozen=True)
class TrustMap:
    """The calibration map of trust, raw score -> P(right) (fitted by
    :mod:`conceptguard.trust_map`): ``x``: strictly increasing knots on the raw scale from 0
    to 1; ``y``: the calibrated values there, strictly increasing."""

    x: np.ndarray
    y: np.ndarray

    def __call__(self, raw: np.ndarray | float) -> np.ndarray:
        return np.interp(np.asarray(raw, np.float64), self.x, self.y)

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.x, self.y))


IDENTITY = TrustMap(np.array([0.0, 1.0]), np.array([0.0, 1.0]))

ReasonKind = Literal["accepted", "misclassification-like", "adversarial-like", "unfamiliar"]
REASON_KINDS: tuple[ReasonKind, ...] = ("accepted", "misclassification-like",
                                        "adversarial-like", "unfamiliar")
HEADS: tuple[str, ...] = ("misclassification", "anomaly", "adversarial", "unfamiliar")
HINGE_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99)

CONFIDENCE: tuple[str, ...] = tuple(n for n, c in DETECTORS.items() if c.group == "confidence")
HINGED: tuple[str, ...] = tuple(n for n, c in DETECTORS.items() if c.hinged)


def misclassification_columns(with_density: bool) -> np.ndarray:
    """The columns the misclassification head reads: the confidence features, and with
    ``with_density`` the density hinges too (a boolean mask over :func:`feature_names`)."""
    names = feature_names()
    return np.array([i < len(CONFIDENCE) or (with_density and ">q" in n)
                     for i, n in enumerate(names)])


def feature_names() -> list[str]:
    """Column names of :func:`design`'s full matrix (the first ``len(CONFIDENCE)`` columns
    are the confidence features)."""
    names = list(CONFIDENCE) + [n for n in DETECTORS if n not in CONFIDENCE]
    names += [f"{n}>q{int(q * 100)}" for n in HINGED for q in HINGE_QUANTILES]
    return names


def detector_features(risks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: DETECTORS[n].feature(risks[n]) for n in DETECTORS}


def hinge_knots(reference_risks: dict[str, np.ndarray]) -> np.ndarray:
    """``(len(HINGED), len(HINGE_QUANTILES))`` knots on the feature scale."""
    feats = detector_features(reference_risks)
    return np.array([np.quantile(feats[n], HINGE_QUANTILES) for n in HINGED])


def design(risks: dict[str, np.ndarray], knots: np.ndarray) -> np.ndarray:
    """The trust model's design matrix ``(N, len(feature_names()))``."""
    feats = detector_features(risks)
    cols = [feats[n] for n in CONFIDENCE] + [feats[n] for n in DETECTORS
                                             if n not in CONFIDENCE]
    for i, n in enumerate(HINGED):
        cols += [np.maximum(feats[n] - q, 0.0) for q in knots[i]]
    return np.stack(cols, axis=1)


@dataclass(frozen=True)
class TrustModel:
    knots: np.ndarray
    heads: dict[str, LogisticHead]  # keys: HEADS
    mis_columns: np.ndarray  # boolean mask: the design columns the misclassification head reads

    def head_logits(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {h: self.heads[h].logit(x[:, self.mis_columns] if h == "misclassification"
                                       else x) for h in HEADS}


@dataclass(frozen=True)
class TrustResult:
    p: dict[str, np.ndarray]  # per head
    trust: np.ndarray
    reject: np.ndarray
    reason: list[ReasonKind]


def reasons(reject: np.ndarray, p_misclassification: np.ndarray, p_anomaly: np.ndarray,
            p_adversarial: np.ndarray, p_unfamiliar: np.ndarray) -> list[ReasonKind]:
    """The reject reason, named by the head that carries the evidence: trust's two factors
    are ``1 - p_misclassification`` and ``1 - p_anomaly``; where the anomaly head is the
    larger (its factor pulled trust down more), the kind heads say which anomaly
    (``adversarial-like`` when ``p_adversarial >= p_unfamiliar``, else ``unfamiliar``);
    otherwise the input is ``misclassification-like``."""
    kind = np.where(np.asarray(p_anomaly) <= p_misclassification, 1,
                    np.where(np.asarray(p_adversarial) >= p_unfamiliar, 2, 3))
    return [REASON_KINDS[i] for i in np.where(reject, kind, 0).tolist()]


def evaluate_trust(model: TrustModel, risks: dict[str, np.ndarray], threshold: float
                   ) -> TrustResult:
    logits = model.head_logits(design(risks, model.knots))
    p = {h: sigmoid(v) for h, v in logits.items()}
    trust = (1.0 - p["misclassification"]) * (1.0 - p["anomaly"])
    reject = trust < threshold
    return TrustResult(p, trust, reject, reasons(reject, p["misclassification"], p["anomaly"],
                                                 p["adversarial"], p["unfamiliar"]))
