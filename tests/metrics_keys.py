"""The metrics.json keys the project promises (keys may be added, never removed). The method
lists come from the detector registry, so a new detector is checked without an edit here."""

from __future__ import annotations

from conceptguard.detectors import DETECTORS
from conceptguard.scoring import OUR_METHODS

METHODS = (*OUR_METHODS, *DETECTORS)
MIS_METHODS = METHODS
ADV_METHODS = METHODS
MIXED_METHODS = METHODS


def _walk(m: dict, path: list[str]) -> bool:
    node = m
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def missing_keys(m: dict) -> list[str]:
    want = ["classifier.test_accuracy", "vlm.zero_shot_accuracy", "aligner.heldout_r2",
            "aligner.heldout_cosine", "threshold.target", "threshold.value",
            "threshold.coverage", "threshold.accepted_accuracy", "fault_localisation.head",
            "fault_localisation.encoder", "fault_localisation.ambiguous",
            "misclassification.held_out", "mixed.held_out", "summary"]
    want += [f"misclassification.{x}.{k}" for x in MIS_METHODS
             for k in ("auroc", "ci95", "fpr_at_95tpr", "aurc", "aurc_ci95")]
    want += [f"reason_precision.{k}.precision" for k in
             ("misclassification-like", "adversarial-like", "unfamiliar")]
    paths = [k.split(".") for k in want]
    # names contain dots (pgd_eps0.05): walk them as single keys
    for section in ("adversarial", "shift", "foreign"):
        for task in m.get(section, {}):
            paths += [[section, task, x, k] for x in ADV_METHODS for k in ("auroc", "ci95")]
            paths += [[section, task, k] for k in ("held_out", "best_peer", "margin",
                                                   "margin_ci95")]
        if not m.get(section):
            paths.append([section, "<task>"])
    paths += [["shift", t, k] for t in m.get("shift", {})
              for k in ("accuracy", "accepted_accuracy")]
    paths += [["mixed", x, k] for x in MIXED_METHODS
              for k in ("aurc", "aurc_ci95", "risk_at_90_coverage")]
    for mix in ("clean_heavy", "shift_heavy", "attack_heavy", "foreign_heavy"):
        paths += [["mixed_compositions", mix, x, "aurc"] for x in MIXED_METHODS]
        paths += [["mixed_compositions", mix, "trust_minus"]]
    paths += [["mixed", "trust_minus"], ["summary_streams"]]
    # trust as P(right) (issue 22): ECE per kind, the reject target on held-out data, and
    # estimated vs. realised accuracy per stream
    paths += [["trust_calibration", "ece", k, "calibrated"]
              for k in ("clean", "corruption", "attack", "foreign", "fitting_stream")]
    paths += [["trust_calibration", "reject_target_heldout", k]
              for k in ("measured", "ci95", "met")]
    paths += [["trust_calibration", "estimated_accuracy", "clean", k]
              for k in ("estimated", "realised", "error")]
    paths += [["threshold", "raw"]]
    paths += [["timings_s", s] for s in ("data", "classifier", "vlm", "aligner", "adversarial",
                                         "stream", "heatmaps", "calibration", "evaluation",
                                         "report")]
    return [".".join(p) for p in paths if not _walk(m, p)]
