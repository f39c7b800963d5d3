"""The one scoring function shared by the offline evaluation and the online service.

Input: the classifier's logits, features and standardised concept scores for a batch.
Output: prediction, both defect-head probabilities, the calibrated ``trust``, the reject
decision, the paper's rule, and the concepts behind the decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from conceptguard.heads import Combiner, LogisticHead
from conceptguard.projection import unit_rows
from conceptguard.signals import Signals, SignalStats, compute_signals, head_features

RejectReason = Literal["accepted", "misclassification-like", "adversarial-like"]


@dataclass(frozen=True)
class Monitor:
    """Everything scoring needs, loaded from the bank."""

    stats: SignalStats
    head_mis: LogisticHead
    head_adv: LogisticHead
    combiner: Combiner
    threshold: float  # reject when trust < threshold

    @property
    def num_classes(self) -> int:
        return int(self.stats.h_ok.shape[0])

    @property
    def num_concepts(self) -> int:
        return int(self.stats.h_ok.shape[1])


@dataclass(frozen=True)
class Scores:
    """Per-input results of :func:`score`, all arrays of length N (or N x K)."""

    signals: Signals
    p_misclassification: np.ndarray
    p_adversarial: np.ndarray
    trust: np.ndarray
    reject: np.ndarray
    reason: list[RejectReason]
    paper_rule_reject: np.ndarray
    contributions: np.ndarray  # (N, K): per-concept share of sim_ok - max(sim_bad, sim_adv)

    @property
    def predictions(self) -> np.ndarray:
        return self.signals.predictions


def concept_contributions(concepts: np.ndarray, predictions: np.ndarray,
                          stats: SignalStats, against_adv: np.ndarray) -> np.ndarray:
    """Signed per-concept terms of ``cos(s, H_ok) - cos(s, H_x)`` (they sum to it), with
    ``H_x`` the adversarial heatmap where ``against_adv`` and the incorrect one elsewhere.
    Negative terms pulled the input towards the defect profile."""
    s_unit = unit_rows(concepts)
    ok = stats.unit_ok[predictions]
    other = np.where(against_adv[:, None], stats.unit_adv[predictions],
                     stats.unit_bad[predictions])
    return s_unit * (ok - other)


def score(monitor: Monitor, logits: np.ndarray, features: np.ndarray,
          concepts: np.ndarray) -> Scores:
    """Score a batch. Shapes: ``logits (N,C)``, ``features (N,d)``, ``concepts (N,K)``."""
    sig = compute_signals(logits, features, concepts, monitor.stats)
    x = head_features(sig)
    logit_mis = monitor.head_mis.logit(x)
    logit_adv = monitor.head_adv.logit(x)
    trust = monitor.combiner.trust(logit_mis, logit_adv)
    reject = trust < monitor.threshold
    part_mis, part_adv = monitor.combiner.parts(logit_mis, logit_adv)
    adv_side = part_adv > part_mis
    reason: list[RejectReason] = [
        ("adversarial-like" if a else "misclassification-like") if r else "accepted"
        for r, a in zip(reject.tolist(), adv_side.tolist(), strict=True)
    ]
    paper = np.maximum(sig.sim_bad, sig.sim_adv) > sig.sim_ok
    against_adv = sig.sim_adv > sig.sim_bad
    return Scores(
        signals=sig,
        p_misclassification=1.0 / (1.0 + np.exp(-logit_mis)),
        p_adversarial=1.0 / (1.0 + np.exp(-logit_adv)),
        trust=trust,
        reject=reject,
        reason=reason,
        paper_rule_reject=paper,
        contributions=concept_contributions(concepts, sig.predictions, monitor.stats,
                                            against_adv),
    )


def top_reasons(contributions: np.ndarray, names: list[str], k: int = 3
                ) -> list[tuple[str, float]]:
    """The ``k`` concepts with the largest |contribution| for one input, signed."""
    order = np.argsort(-np.abs(contributions))[:k]
    return [(names[i], float(contributions[i])) for i in order]


# Risk scores (higher = more suspicious) of every method the evaluation compares.
def method_risks(scores: Scores) -> dict[str, np.ndarray]:
    sig = scores.signals
    return {
        "trust": 1.0 - scores.trust,
        "head_misclassification": scores.p_misclassification,
        "head_adversarial": scores.p_adversarial,
        "paper_rule": np.maximum(sig.sim_bad, sig.sim_adv) - sig.sim_ok,
        "heatmap_cosine": sig.sim_bad - sig.sim_ok,
        "msp": -sig.msp,
        "max_logit": -sig.max_logit,
        "energy": -sig.energy,
        "doctor": sig.doctor,
        "mahalanobis": sig.maha_feat,
        "concept_mahalanobis": sig.maha_concept,
    }


BASELINES: tuple[str, ...] = ("msp", "max_logit", "energy", "doctor", "mahalanobis")
