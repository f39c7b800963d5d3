"""The one scoring function shared by the offline evaluation and the online service.

Input: the classifier's logits, features and standardised concept scores for a batch.
Output: prediction, every detector's risk, the trust model's heads, ``trust`` (an estimate
of P(prediction is right)), the reject decision and its reason kind, the paper's rule, and
the concepts behind the decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conceptguard.detectors import Detector, Outputs, PaperRule, detector_risks
from conceptguard.trust import ReasonKind, TrustModel, evaluate_trust

RejectReason = ReasonKind  # the name the service has used since v1


@dataclass(frozen=True)
class Monitor:
    """Everything scoring needs, loaded from the bank."""

    detectors: dict[str, Detector]
    trust_model: TrustModel
    threshold: float  # reject when trust < threshold

    @property
    def heatmaps(self) -> PaperRule:
        rule = self.detectors["paper_rule"]
        assert isinstance(rule, PaperRule)
        return rule

    @property
    def num_classes(self) -> int:
        return int(self.heatmaps.h_ok.shape[0])

    @property
    def num_concepts(self) -> int:
        return int(self.heatmaps.h_ok.shape[1])


@dataclass(frozen=True)
class Scores:
    """Per-input results of :func:`score`, all arrays of length N (or N x C / N x K)."""

    probabilities: np.ndarray
    predictions: np.ndarray
    risks: dict[str, np.ndarray]  # every detector's risk (higher = more suspicious)
    p_misclassification: np.ndarray
    p_anomaly: np.ndarray
    p_adversarial: np.ndarray
    p_unfamiliar: np.ndarray
    trust: np.ndarray
    reject: np.ndarray
    reason: list[RejectReason]
    paper_rule_reject: np.ndarray
    contributions: np.ndarray  # (N, K): per-concept share of sim_ok - max(sim_bad, sim_adv)

    def __len__(self) -> int:
        return len(self.trust)


def concept_contributions(out: Outputs, rule: PaperRule) -> np.ndarray:
    """Signed per-concept terms of ``cos(s, H_ok) - cos(s, H_x)`` (they sum to it), with
    ``H_x`` the adversarial heatmap where the input is closer to it than to the incorrect
    one. Negative terms pulled the input towards the defect profile."""
    ok, bad, adv = rule.units
    _, sim_bad, sim_adv = rule.sims(out)
    pred = out.predictions
    other = np.where((sim_adv > sim_bad)[:, None], adv[pred], bad[pred])
    return out.unit_concepts * (ok[pred] - other)


def score(monitor: Monitor, logits: np.ndarray, features: np.ndarray,
          concepts: np.ndarray) -> Scores:
    """Score a batch. Shapes: ``logits (N,C)``, ``features (N,d)``, ``concepts (N,K)``."""
    out = Outputs(np.asarray(logits, np.float32), np.asarray(features, np.float32),
                  np.asarray(concepts, np.float32))
    risks = detector_risks(monitor.detectors, out)
    t = evaluate_trust(monitor.trust_model, risks, monitor.threshold)
    return Scores(
        probabilities=out.probabilities,
        predictions=out.predictions,
        risks=risks,
        p_misclassification=t.p["misclassification"],
        p_anomaly=t.p["anomaly"],
        p_adversarial=t.p["adversarial"],
        p_unfamiliar=t.p["unfamiliar"],
        trust=t.trust,
        reject=t.reject,
        reason=t.reason,
        paper_rule_reject=risks["paper_rule"] > 0,
        contributions=concept_contributions(out, monitor.heatmaps),
    )


def top_reasons(contributions: np.ndarray, names: list[str], k: int = 3
                ) -> list[tuple[str, float]]:
    """The ``k`` concepts with the largest |contribution| for one input, signed."""
    order = np.argsort(-np.abs(contributions))[:k]
    return [(names[i], float(contributions[i])) for i in order]


OUR_METHODS: tuple[str, ...] = ("trust", "head_misclassification", "head_anomaly",
                                "head_adversarial", "head_unfamiliar")


def method_risks(scores: Scores) -> dict[str, np.ndarray]:
    """Risk scores (higher = more suspicious) of every method the evaluation compares: ours,
    then every registered detector."""
    return {
        "trust": 1.0 - scores.trust,
        "head_misclassification": scores.p_misclassification,
        "head_anomaly": scores.p_anomaly,
        "head_adversarial": scores.p_adversarial,
        "head_unfamiliar": scores.p_unfamiliar,
        **scores.risks,
    }
