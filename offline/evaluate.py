"""The evaluation stage: every task scored by a monitor that never saw its family
(leave-one-family-out), against every registered detector, with bootstrap intervals."""

from __future__ import annotations

import numpy as np

from conceptguard.calibration import GROUPS, Batch, FittedMonitor, refit_without, stream_weights
from conceptguard.estimation import ece_entry, estimated_accuracy, reject_target_check
from conceptguard.evaluation import (
    EvalSet,
    adversarial_section,
    composition_sections,
    foreign_section,
    misclassification_section,
    mixed_section,
    shift_section,
    stream_summary,
    summary_table,
    threshold_section,
)
from conceptguard.scoring import Monitor, Scores, score


def _score(m: Monitor, b: Batch) -> Scores:
    return score(m, b.logits, b.features, b.concepts)


def evaluate(cfg, fitted: FittedMonitor, stream: Batch, clean: Scores, labels: np.ndarray,
             sets: dict[str, dict[str, Batch]], attempted: dict[str, int], seed: int,
             clean_probabilities: np.ndarray | None = None) -> dict:
    """metrics.json sections: misclassification, threshold, shift, adversarial, foreign,
    mixed (with reason precision), the per-task summary and ``trust_calibration`` (ECE per
    kind, the reject target on held-out data, estimated vs. realised accuracy beside
    NannyML's CBPE; ``clean_probabilities``: the clean test split's predicted
    probabilities, for CBPE)."""
    fit_families = set(np.unique(stream.family).tolist()) - {"clean"}
    heatmap_family = cfg.adversarial.heatmap_attack.family
    monitors: dict[str, Monitor] = {}

    def held_out_monitor(family: str) -> tuple[Monitor, bool | str]:
        if family not in fit_families:
            held: bool | str = True
            m = fitted.monitor
        else:
            if family not in monitors:
                monitors[family] = refit_without(fitted, stream, family, cfg.calibration, seed)
            m, held = monitors[family], True
        if family == heatmap_family:
            held = (f"held out of the fitting stream; H_adv was built from "
                    f"{cfg.adversarial.heatmap_attack.name} on the reference split")
        return m, held

    ev = cfg.evaluation
    kw = {"resamples": ev.bootstrap, "seed": seed}
    evalsets: list[EvalSet] = []
    for group, by_name in sets.items():
        for name, batch in by_name.items():
            family = str(batch.family[0]) if len(batch) else name
            m, held = held_out_monitor(family)
            evalsets.append(EvalSet(name, group, family, _score(m, batch), batch.labels, held,
                                    batch.source))
    n_clean = min(len(labels), ev.mixed.get("clean", 2000))
    clean_set = EvalSet("clean", "clean", "clean", _subset(clean, n_clean), labels[:n_clean],
                        True)  # source ids: test rows
    clean_all = EvalSet("clean", "clean", "clean", clean, labels, True)
    comparators = fitted.info.get("comparators", {})

    def comparator(group: str, family: str) -> str | None:
        return comparators.get(family, comparators.get(group))
    by = {(e.group, e.name): e for e in evalsets}
    target = cfg.calibration
    target_text = (f"accept at least {target.value:.0%} of correct clean predictions"
                   if target.target == "accept_correct" else
                   f"weighted error rate among accepted inputs at most {target.value:.1%}")
    out: dict = {
        "misclassification": misclassification_section(
            clean, labels, comparator=comparators.get("clean"), **kw),
        "threshold": threshold_section(clean, labels, target_text, target.value,
                                       fitted.monitor.calibrated_threshold),
        "shift": {n: shift_section(by["corruption", n], **kw,
                                   comparator=comparator("corruption", by["corruption", n].family))
                  for n in sets["corruption"]},
        "adversarial": {n: adversarial_section(
            clean, labels, by["attack", n], attempted[n], **kw,
            comparator=comparator("attack", by["attack", n].family)) for n in sets["attack"]},
        "foreign": {n: foreign_section(clean_set, by["foreign", n], **kw,
                                       comparator=comparator("foreign", by["foreign", n].family))
                    for n in sets["foreign"]},
        "mixed": mixed_section([clean_set, *evalsets], ev.mixed, **kw),
        "mixed_compositions": composition_sections([clean_all, *evalsets],
                                                   ev.composition_size, **kw),
    }
    out["threshold"]["raw"] = round(fitted.monitor.threshold, 6)
    out["trust_calibration"] = trust_calibration_section(
        cfg, fitted, stream, clean, labels, evalsets, clean_probabilities, **kw)
    out["reason_precision"] = out["mixed"]["reason_precision"]
    out["summary"] = summary_table(out)
    out["summary_streams"] = stream_summary(out)
    return out


def _subset(s: Scores, n: int) -> Scores:
    return s.rows(np.arange(n))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def trust_calibration_section(cfg, fitted: FittedMonitor, stream: Batch, clean: Scores,
                              labels: np.ndarray, evalsets: list[EvalSet],
                              clean_probabilities: np.ndarray | None, *, resamples: int,
                              seed: int) -> dict:
    """ECE per traffic kind (held-out test sets, each scored by the monitor that never saw
    its family; the fitting stream cross-fitted), the reject target on the test split with
    its bootstrap interval, and per stream the estimated accuracy (mean calibrated trust)
    against the realised one, beside CBPE."""
    from offline.cbpe import cbpe_accuracy

    clean_right = clean.predictions == labels
    ece: dict = {"clean": ece_entry(clean.trust, clean_right, clean.raw_trust)}
    for g in GROUPS[1:]:
        parts = [e for e in evalsets if e.group == g and len(e.scores)]
        if parts:
            raw = (None if any(e.scores.raw_trust is None for e in parts)
                   else np.concatenate([e.scores.raw_trust for e in parts]))
            ece[g] = ece_entry(np.concatenate([e.scores.trust for e in parts]),
                               np.concatenate([~e.wrong for e in parts]), raw)
    ece["fitting_stream"] = fitted.info.get("stream_ece", {}).get("stream", {})
    ece["fitting_stream_by_kind"] = {k: v for k, v in fitted.info.get("stream_ece", {}).items()
                                     if k != "stream"}

    # the reject target on held-out data: the clean test split (accept_correct), or every
    # test set weighted with the fitting stream's kind shares (max_risk)
    spec = cfg.calibration
    group = np.concatenate([np.full(len(clean), "clean", dtype=object),
                            *(np.full(len(e.scores), e.group, dtype=object) for e in evalsets)])
    family = np.concatenate([np.full(len(clean), "clean", dtype=object),
                             *(np.full(len(e.scores), e.family, dtype=object)
                               for e in evalsets)])
    accepted = np.concatenate([~clean.reject, *(~e.scores.reject for e in evalsets)])
    wrong = np.concatenate([~clean_right, *(e.wrong for e in evalsets)])
    correct_clean = np.r_[clean_right, np.zeros(len(group) - len(clean), bool)]
    check = reject_target_check(spec.target, spec.value, accepted, wrong, correct_clean,
                                stream_weights(group, family, spec.shares),
                                resamples=resamples, seed=seed)

    rows = {"clean": estimated_accuracy(clean.trust, clean_right, clean.raw_trust)}
    probs: dict[str, np.ndarray] = {}
    if clean_probabilities is not None and len(clean_probabilities) == len(clean):
        probs["clean"] = clean_probabilities
    for e in evalsets:
        key = f"{e.group}/{e.name}"
        rows[key] = {"kind": e.group,
                     **estimated_accuracy(e.scores.trust, ~e.wrong, e.scores.raw_trust)}
        if e.scores.probabilities.shape[1]:
            probs[key] = e.scores.probabilities
    rows["clean"] = {"kind": "clean", **rows["clean"]}
    ref = stream.select(stream.group == "clean")
    cbpe = cbpe_accuracy(_softmax(ref.logits), ref.labels, probs)
    for key, est in cbpe.get("estimates", {}).items():
        rows[key]["cbpe"] = est
        rows[key]["cbpe_error"] = round(est - rows[key]["realised"], 4)
    return {
        "ece": ece,
        "ece_bins": 10,
        "reject_target_heldout": check,
        "estimated_accuracy": rows,
        "cbpe": {k: v for k, v in cbpe.items() if k != "estimates"},
        "note": ("attack sets hold successful attacks only (realised accuracy 0) and "
                 "foreign inputs are never right: there the estimate's error is its mean"),
    }
