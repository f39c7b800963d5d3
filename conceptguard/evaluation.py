"""Evaluation of the trust score against the baselines, one loop for every method.

Pure: takes :class:`~conceptguard.scoring.Scores` of the clean test inputs and of each
attack's successful adversarial inputs, returns the metrics.json sections.
"""

from __future__ import annotations

import numpy as np

from conceptguard.metrics import aurc, auroc, detection_summary, risk_at_coverage
from conceptguard.scoring import Scores, method_risks

MISCLASSIFICATION_METHODS = ("trust", "head_misclassification", "paper_rule", "heatmap_cosine",
                             "msp", "max_logit", "energy", "doctor", "mahalanobis",
                             "concept_mahalanobis")
ADVERSARIAL_METHODS = ("trust", "head_adversarial", "paper_rule", "heatmap_cosine", "msp",
                       "max_logit", "energy", "doctor", "mahalanobis", "concept_mahalanobis")
MIXED_METHODS = ("trust", "head_misclassification", "head_adversarial", "paper_rule", "msp",
                 "max_logit", "energy", "doctor", "mahalanobis", "concept_mahalanobis")


def _r(x: float) -> float:
    return round(float(x), 5)


def misclassification_section(clean: Scores, labels: np.ndarray) -> dict:
    wrong = clean.predictions != labels
    risks = method_risks(clean)
    out: dict = {m: {k: _r(v) for k, v in detection_summary(risks[m], wrong).items()}
                 for m in MISCLASSIFICATION_METHODS}
    # The paper's rule is a decision: how often is "reject" == "wrong"?
    out["paper_rule"]["decision_accuracy"] = _r((clean.paper_rule_reject == wrong).mean())
    out["paper_rule"]["reject_rate"] = _r(clean.paper_rule_reject.mean())
    out["trust"]["decision_accuracy"] = _r((clean.reject == wrong).mean())
    out["n"] = int(len(labels))
    out["n_wrong"] = int(wrong.sum())
    return out


def adversarial_section(clean: Scores, labels: np.ndarray, adv: Scores, attempted: int
                        ) -> dict:
    """Clean correct inputs (negatives) vs. successful adversarial inputs (positives)."""
    correct = clean.predictions == labels
    risks_clean, risks_adv = method_risks(clean), method_risks(adv)
    positive = np.concatenate([np.zeros(int(correct.sum()), bool), np.ones(len(adv.trust), bool)])
    out: dict = {}
    for m in ADVERSARIAL_METHODS:
        s = np.concatenate([risks_clean[m][correct], risks_adv[m]])
        out[m] = {"auroc": _r(auroc(s, positive))}
    out["trust"]["detection_rate_at_threshold"] = _r(adv.reject.mean()) if len(adv.trust) \
        else float("nan")
    out["trust"]["false_reject_rate_clean_correct"] = _r(clean.reject[correct].mean())
    out["paper_rule"]["detection_rate"] = _r(adv.paper_rule_reject.mean()) if len(adv.trust) \
        else float("nan")
    out["attempted"] = int(attempted)
    out["successful"] = int(len(adv.trust))
    out["success_rate"] = _r(len(adv.trust) / max(attempted, 1))
    return out


def threshold_section(clean: Scores, labels: np.ndarray, target: str, target_value: float,
                      threshold: float) -> dict:
    correct = clean.predictions == labels
    accepted = ~clean.reject
    return {
        "target": target,
        "target_value": target_value,
        "value": _r(threshold),
        "coverage": _r(accepted.mean()),
        "accepted_accuracy": _r(correct[accepted].mean()) if accepted.any() else float("nan"),
        "accept_rate_correct": _r(accepted[correct].mean()),
        "reject_rate_wrong": _r((~accepted)[~correct].mean()) if (~correct).any() else 0.0,
    }


def mixed_section(clean: Scores, labels: np.ndarray, adv_pool: list[Scores],
                  fraction: float, seed: int) -> dict:
    """A stream of all clean test inputs plus a seeded sample of successful adversarial
    inputs (pooled over attacks) that makes up ``fraction`` of the stream. An input is an
    error when its prediction is wrong (every successful adversarial input is)."""
    risks_clean = method_risks(clean)
    pooled = {m: np.concatenate([method_risks(a)[m] for a in adv_pool]) if adv_pool
              else np.zeros(0) for m in MIXED_METHODS}
    rejects = np.concatenate([a.reject for a in adv_pool]) if adv_pool else np.zeros(0, bool)
    n_pool = len(rejects)
    n_adv = min(n_pool, int(round(fraction / (1 - fraction) * len(labels))))
    pick = np.random.default_rng(seed).choice(n_pool, size=n_adv, replace=False)
    error = np.concatenate([clean.predictions != labels, np.ones(n_adv, bool)])
    out: dict = {
        "description": (f"all {len(labels)} clean test inputs + {n_adv} successful "
                        f"adversarial inputs sampled from every attack "
                        f"({n_adv / max(len(error), 1):.1%} of the stream); error = wrong "
                        "prediction"),
        "n_clean": int(len(labels)), "n_adversarial": int(n_adv),
        "error_rate": _r(error.mean()),
    }
    for m in MIXED_METHODS:
        s = np.concatenate([risks_clean[m], pooled[m][pick]])
        out[m] = {"aurc": _r(aurc(s, error)),
                  "risk_at_90_coverage": _r(risk_at_coverage(s, error, 0.9)),
                  "auroc": _r(auroc(s, error))}
    accepted = np.concatenate([~clean.reject, ~rejects[pick]])
    out["trust"]["coverage_at_threshold"] = _r(accepted.mean())
    out["trust"]["risk_at_threshold"] = _r(error[accepted].mean()) if accepted.any() else 0.0
    return out
