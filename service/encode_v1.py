"""The v1 encoder: :class:`~conceptguard.scoring.Scores` of a request -> the v1 JSON body.

One object per input (label, top-k probabilities, trust, reject, reason with its concepts,
the defect heads, the paper's rule); a single-image request gets that object, a batch gets
``{"results": [...]}``; both carry the bank reference and the latency so far.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conceptguard.scoring import Scores, top_reasons
from service.dataplane import check_finite
from service.runtime_state import Loaded
from service.settings import Settings


def labels(loaded: Loaded, scores: Scores) -> list[str]:
    classes = loaded.classes
    return [classes[p] for p in scores.predictions.tolist()]


def top_probabilities(loaded: Loaded, row: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable classes of one input's probabilities, most probable first."""
    k = min(k, len(row))
    top = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
    top = top[np.argsort(-row[top], kind="stable")]
    classes = loaded.classes
    return [(classes[j], float(row[j])) for j in top.tolist()]


def summary(label: str, concepts: list[tuple[str, float]]) -> str:
    against = [f"{c} ({v:+.2f})" for c, v in concepts if v < 0]
    support = [f"{c} ({v:+.2f})" for c, v in concepts if v >= 0]
    parts = [f"predicted {label}"]
    if against:
        parts.append("evidence against: " + ", ".join(against))
    if support:
        parts.append("evidence for: " + ", ".join(support))
    return "; ".join(parts)


def rows(loaded: Loaded, scores: Scores, settings: Settings) -> list[dict[str, Any]]:
    """Per-input v1 dicts (plain Python types, ready for JSON)."""
    names = labels(loaded, scores)
    preds = scores.predictions.tolist()
    trust = scores.trust.tolist()
    reject = scores.reject.tolist()
    p_mis = scores.p_misclassification.tolist()
    p_adv = scores.p_adversarial.tolist()
    p_unf = scores.p_unfamiliar.tolist()
    p_anom = scores.p_anomaly.tolist()
    paper = scores.paper_rule_reject.tolist()
    k = settings.reason_concepts
    out = []
    for i, label in enumerate(names):
        concepts = (top_reasons(scores.contributions[i], loaded.concept_names, k)
                    if k > 0 else [])
        out.append({
            "label": label,
            "class_index": preds[i],
            "probabilities": [{"label": lab, "probability": p} for lab, p in
                              top_probabilities(loaded, scores.probabilities[i],
                                                settings.top_k)],
            "trust": trust[i],
            "reject": reject[i],
            "reason": {"kind": scores.reason[i], "summary": summary(label, concepts),
                       "concepts": [{"concept": c, "contribution": v} for c, v in concepts]},
            "heads": {"misclassification": p_mis[i], "anomaly": p_anom[i],
                      "adversarial": p_adv[i], "unfamiliar": p_unf[i]},
            "paper_rule_reject": paper[i],
        })
    return out


def encode(loaded: Loaded, scores: Scores, settings: Settings, *, single: bool,
           latency_ms: float) -> dict[str, Any]:
    """The v1 response body (422 when a score is not finite)."""
    for name in ("trust", "p_misclassification", "p_adversarial", "probabilities"):
        check_finite(name, getattr(scores, name))
    items = rows(loaded, scores, settings)
    bank = loaded.bank_ref()
    if single:
        return {**items[0], "bank": bank, "latency_ms": latency_ms}
    return {"results": items, "bank": bank, "latency_ms": latency_ms}
