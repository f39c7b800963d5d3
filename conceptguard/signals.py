"""Per-input signals that are free at serving time, computed from the classifier's outputs.

Every detector (ours and the baselines) is a function of these signals, so the offline
evaluation and the service score inputs with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from conceptguard.gaussian import ClassGaussians
from conceptguard.projection import unit_rows


@dataclass(frozen=True)
class SignalStats:
    """What the signals need from the bank."""

    h_ok: np.ndarray  # (C, K)
    h_bad: np.ndarray  # (C, K)
    h_adv: np.ndarray  # (C, K)
    features: ClassGaussians  # over classifier features
    concepts: ClassGaussians  # over standardised concept scores

    @cached_property
    def unit_ok(self) -> np.ndarray:
        return unit_rows(self.h_ok)

    @cached_property
    def unit_bad(self) -> np.ndarray:
        return unit_rows(self.h_bad)

    @cached_property
    def unit_adv(self) -> np.ndarray:
        return unit_rows(self.h_adv)


@dataclass(frozen=True)
class Signals:
    """One value per input for each signal; ``probabilities`` and ``predictions`` ride along."""

    probabilities: np.ndarray  # (N, C)
    predictions: np.ndarray  # (N,)
    msp: np.ndarray
    max_logit: np.ndarray
    energy: np.ndarray  # logsumexp of the logits (negative free energy)
    doctor: np.ndarray  # DOCTOR D_alpha: (1 - g) / g with g = sum p^2
    maha_feat: np.ndarray  # min over classes of squared feature Mahalanobis distance
    maha_feat_pred: np.ndarray  # ... to the predicted class
    maha_concept: np.ndarray  # the same in the standardised concept space
    maha_concept_pred: np.ndarray
    sim_ok: np.ndarray  # cos(s^, H_ok[y^])
    sim_bad: np.ndarray  # cos(s^, H_bad[y^])
    sim_adv: np.ndarray  # cos(s^, H_adv[y^])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(1, keepdims=True)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    m = logits.max(1)
    return m + np.log(np.exp(logits - m[:, None]).sum(1))


def _rowwise(matrix: np.ndarray, index: np.ndarray) -> np.ndarray:
    return matrix[np.arange(len(index)), index]


def compute_signals(logits: np.ndarray, features: np.ndarray, concepts: np.ndarray,
                    stats: SignalStats) -> Signals:
    """All signals for a batch: ``logits (N,C)``, ``features (N,d)``, ``concepts (N,K)``."""
    logits = np.asarray(logits, dtype=np.float32)
    probs = softmax(logits)
    pred = probs.argmax(1)
    g = (probs * probs).sum(1)
    d_feat = stats.features.sq_distances(features)
    d_conc = stats.concepts.sq_distances(concepts)
    s_unit = unit_rows(concepts)
    return Signals(
        probabilities=probs,
        predictions=pred,
        msp=probs.max(1),
        max_logit=logits.max(1),
        energy=logsumexp(logits),
        doctor=(1.0 - g) / g,
        maha_feat=d_feat.min(1),
        maha_feat_pred=_rowwise(d_feat, pred),
        maha_concept=d_conc.min(1),
        maha_concept_pred=_rowwise(d_conc, pred),
        sim_ok=(s_unit * stats.unit_ok[pred]).sum(1),
        sim_bad=(s_unit * stats.unit_bad[pred]).sum(1),
        sim_adv=(s_unit * stats.unit_adv[pred]).sum(1),
    )


FEATURE_NAMES: tuple[str, ...] = (
    "msp", "log1m_msp", "max_logit", "energy", "log_doctor",
    "log_maha_feat", "log_maha_feat_pred", "log_maha_concept", "log_maha_concept_pred",
    "sim_ok", "sim_bad", "sim_adv", "sim_gap",
)


def head_features(sig: Signals) -> np.ndarray:
    """The design matrix of the defect heads: monotone transforms of every signal."""
    cols = [
        sig.msp,
        np.log1p(-np.minimum(sig.msp, 1 - 1e-7)),
        sig.max_logit,
        sig.energy,
        np.log(sig.doctor + 1e-7),
        np.log1p(sig.maha_feat),
        np.log1p(sig.maha_feat_pred),
        np.log1p(sig.maha_concept),
        np.log1p(sig.maha_concept_pred),
        sig.sim_ok,
        sig.sim_bad,
        sig.sim_adv,
        sig.sim_ok - np.maximum(sig.sim_bad, sig.sim_adv),
    ]
    return np.stack(cols, axis=1).astype(np.float64)
