"""The trust model: detector risks -> P(prediction is right), as fitted offline.

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
attack) and ``p_unfamiliar`` (a corrupted/shifted or foreign input). Applying the model, the
calibration map of trust, the reject decision and its reason happen at scoring time, in
:mod:`conceptguard.scoring` (the module the service runs per batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conceptguard.detectors import DETECTORS
from conceptguard.heads import LogisticHead

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
