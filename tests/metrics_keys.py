"""The metrics.json keys the offline-job issue promises (keys may be added, never removed)."""

from __future__ import annotations

MIS_METHODS = ("trust", "paper_rule", "msp", "max_logit", "energy", "doctor", "mahalanobis",
               "head_misclassification")
ADV_METHODS = ("trust", "paper_rule", "msp", "max_logit", "energy", "doctor", "mahalanobis",
               "head_adversarial")
MIXED_METHODS = ("trust", "msp", "max_logit", "energy", "doctor", "mahalanobis")


def missing_keys(m: dict) -> list[str]:
    want = ["classifier.test_accuracy", "vlm.zero_shot_accuracy", "aligner.heldout_r2",
            "aligner.heldout_cosine", "threshold.target", "threshold.value",
            "threshold.coverage", "threshold.accepted_accuracy", "fault_localisation.head",
            "fault_localisation.encoder", "fault_localisation.ambiguous"]
    want += [f"misclassification.{x}.{k}" for x in MIS_METHODS
             for k in ("auroc", "fpr_at_95tpr", "aurc")]
    paths = [k.split(".") for k in want]
    for attack in m.get("adversarial", {}):  # attack names contain dots (pgd_eps0.05)
        paths += [["adversarial", attack, x, "auroc"] for x in ADV_METHODS]
    paths += [["mixed", x, k] for x in MIXED_METHODS for k in ("aurc", "risk_at_90_coverage")]
    paths += [["timings_s", s] for s in ("data", "classifier", "vlm", "aligner", "adversarial",
                                         "heatmaps", "calibration", "evaluation", "report")]
    out = []
    for path in paths:
        node = m
        for part in path:
            if not isinstance(node, dict) or part not in node:
                out.append(".".join(path))
                break
            node = node[part]
    if not m.get("adversarial"):
        out.append("adversarial.<attack>")
    return out
