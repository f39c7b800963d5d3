"""The evaluation stage: every task scored by a monitor that never saw its family
(leave-one-family-out), against every registered detector, with bootstrap intervals."""

from __future__ import annotations

import numpy as np

from conceptguard.calibration import Batch, FittedMonitor, refit_without
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
             sets: dict[str, dict[str, Batch]], attempted: dict[str, int], seed: int) -> dict:
    """metrics.json sections: misclassification, threshold, shift, adversarial, foreign,
    mixed (with reason precision) and the per-task summary."""
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
                                       fitted.monitor.threshold),
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
    out["reason_precision"] = out["mixed"]["reason_precision"]
    out["summary"] = summary_table(out)
    out["summary_streams"] = stream_summary(out)
    return out


def _subset(s: Scores, n: int) -> Scores:
    return s.rows(np.arange(n))
