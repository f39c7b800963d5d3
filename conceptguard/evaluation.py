"""Evaluation of ``trust`` against every registered detector, one loop for every task.

Pure: takes :class:`~conceptguard.scoring.Scores` of labelled evaluation sets and returns
metrics.json sections. Every AUROC/AURC carries a 95% bootstrap interval (``ci95``); each
task names the strongest standard detector on it (``best_peer``) and the margin of
``trust`` over it with a paired bootstrap interval (the same resamples for both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conceptguard.detectors import BASELINES
from conceptguard.metrics import (
    bootstrap_blocks,
    fpr_at_tpr,
    interval,
    risk_at_coverage,
    weighted_aurc,
    weighted_auroc,
)
from conceptguard.scoring import Scores, method_risks
from conceptguard.trust import REASON_KINDS


def _r(x: float) -> float:
    return round(float(x), 5)


def _ci(samples: np.ndarray) -> list[float]:
    return [_r(v) for v in interval(samples)]


@dataclass(frozen=True)
class EvalSet:
    """Scored inputs of one evaluation family, with what is known about them."""

    name: str
    group: str  # clean | corruption | attack | foreign
    family: str
    scores: Scores
    labels: np.ndarray  # -1 for foreign inputs
    held_out: bool | str  # True, or a note where the family was partly seen

    @property
    def wrong(self) -> np.ndarray:
        return self.scores.predictions != self.labels




def compare(risks: dict[str, np.ndarray], positive: np.ndarray, *, resamples: int, seed: int,
            aurc_error: np.ndarray | None = None) -> dict:
    """AUROC (and AURC against ``aurc_error`` when given) of every method, each with its
    interval, plus the best standard peer and trust's paired margin over it."""
    full = np.ones((1, len(positive)))
    parts: dict[str, list[np.ndarray]] = {m: [] for m in risks}
    aurc_parts: dict[str, list[np.ndarray]] = {m: [] for m in risks}
    # resamples in blocks of bounded size (the same draws as one (resamples, n) matrix)
    for counts in bootstrap_blocks(len(positive), resamples, seed):
        for m, s in risks.items():
            parts[m].append(weighted_auroc(s, positive, counts))
            if aurc_error is not None:
                aurc_parts[m].append(weighted_aurc(s, aurc_error, counts))
    out: dict = {}
    boot: dict[str, np.ndarray] = {m: np.concatenate(p) for m, p in parts.items()}
    for m, s in risks.items():
        point = float(weighted_auroc(s, positive, full)[0])
        entry = {"auroc": _r(point), "ci95": _ci(boot[m])}
        if aurc_error is not None:
            entry["aurc"] = _r(weighted_aurc(s, aurc_error, full)[0])
            entry["aurc_ci95"] = _ci(np.concatenate(aurc_parts[m]))
        out[m] = entry
    peers = [m for m in BASELINES if m in out and np.isfinite(out[m]["auroc"])]
    if peers and "trust" in out:
        best = max(peers, key=lambda m: out[m]["auroc"])
        out["best_peer"] = best
        out["margin"] = _r(out["trust"]["auroc"] - out[best]["auroc"])
        out["margin_ci95"] = _ci(boot["trust"] - boot[best])
    return out


def misclassification_section(clean: Scores, labels: np.ndarray, *, resamples: int,
                              seed: int) -> dict:
    wrong = clean.predictions != labels
    risks = method_risks(clean)
    out = compare(risks, wrong, resamples=resamples, seed=seed, aurc_error=wrong)
    for m in risks:
        out[m]["fpr_at_95tpr"] = _r(fpr_at_tpr(risks[m], wrong, 0.95))
    out["paper_rule"]["decision_accuracy"] = _r((clean.paper_rule_reject == wrong).mean())
    out["paper_rule"]["reject_rate"] = _r(clean.paper_rule_reject.mean())
    out["trust"]["decision_accuracy"] = _r((clean.reject == wrong).mean())
    out.update(n=int(len(labels)), n_wrong=int(wrong.sum()), held_out=True)
    return out


def _reason_counts(s: Scores) -> dict[str, int]:
    return {k: int(sum(r == k for r in s.reason)) for k in REASON_KINDS}


def shift_section(ev: EvalSet, *, resamples: int, seed: int) -> dict:
    """Wrong vs. right predictions under a corruption, and what the threshold does there."""
    s, wrong = ev.scores, ev.wrong
    out = compare(method_risks(s), wrong, resamples=resamples, seed=seed, aurc_error=wrong)
    accepted = ~s.reject
    out.update(
        n=int(len(wrong)), n_wrong=int(wrong.sum()), held_out=ev.held_out,
        accuracy=_r((~wrong).mean()),
        coverage_at_threshold=_r(accepted.mean()),
        accepted_accuracy=_r((~wrong)[accepted].mean()) if accepted.any() else None,
        reasons=_reason_counts(s),
    )
    return out


def adversarial_section(clean: Scores, labels: np.ndarray, ev: EvalSet, attempted: int, *,
                        resamples: int, seed: int) -> dict:
    """Clean correct inputs (negatives) vs. successful adversarial inputs (positives)."""
    correct = clean.predictions == labels
    adv = ev.scores
    r_clean, r_adv = method_risks(clean), method_risks(adv)
    risks = {m: np.concatenate([r_clean[m][correct], r_adv[m]]) for m in r_clean}
    positive = np.r_[np.zeros(int(correct.sum()), bool), np.ones(len(adv), bool)]
    out = compare(risks, positive, resamples=resamples, seed=seed) if len(adv) else {}
    if len(adv):
        out["trust"]["detection_rate_at_threshold"] = _r(adv.reject.mean())
        out["paper_rule"]["detection_rate"] = _r(adv.paper_rule_reject.mean())
        out["reasons"] = _reason_counts(adv)
    out.update(attempted=int(attempted), successful=int(len(adv)),
               success_rate=_r(len(adv) / max(attempted, 1)), held_out=ev.held_out)
    return out


def foreign_section(clean: Scores, ev: EvalSet, *, resamples: int, seed: int) -> dict:
    """Clean test inputs (negatives) vs. a foreign set (positives: never right)."""
    r_clean, r_f = method_risks(clean), method_risks(ev.scores)
    risks = {m: np.concatenate([r_clean[m], r_f[m]]) for m in r_clean}
    positive = np.r_[np.zeros(len(clean), bool), np.ones(len(ev.scores), bool)]
    out = compare(risks, positive, resamples=resamples, seed=seed)
    out["trust"]["detection_rate_at_threshold"] = _r(ev.scores.reject.mean())
    out.update(n=int(len(ev.scores)), n_clean=int(len(clean)), held_out=ev.held_out,
               reasons=_reason_counts(ev.scores))
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
        "unmonitored_accuracy": _r(correct.mean()),
        "accept_rate_correct": _r(accepted[correct].mean()),
        "reject_rate_wrong": _r((~accepted)[~correct].mean()) if (~correct).any() else 0.0,
    }


TRUE_KIND = {"clean": "misclassification-like", "corruption": "unfamiliar",
             "attack": "adversarial-like", "foreign": "unfamiliar"}


def mixed_section(sets: list[EvalSet], shares: dict[str, int], *, resamples: int,
                  seed: int) -> dict:
    """A labelled stream: ``shares[group]`` inputs of each group, drawn evenly (seeded)
    from that group's sets, each scored by the model that never saw its family. An input is
    an error when its prediction is wrong. Also the precision of each reject reason."""
    rng = np.random.default_rng(seed)
    parts: list[Scores] = []
    errors, kinds = [], []
    for group, n in shares.items():
        members = [e for e in sets if e.group == group and len(e.scores)]
        if not members or n == 0:
            continue
        per = int(np.ceil(n / len(members)))
        for e in members:
            pick = np.sort(rng.choice(len(e.scores), size=min(per, len(e.scores)),
                                      replace=False))
            parts.append(e.scores.rows(pick))
            errors.append(e.wrong[pick])
            kinds += [group] * len(pick)
    s = Scores.concat(parts)
    error = np.concatenate(errors)
    kind = np.array(kinds)
    risks = method_risks(s)
    out = compare(risks, error, resamples=resamples, seed=seed, aurc_error=error)
    for m in risks:
        out[m]["risk_at_90_coverage"] = _r(risk_at_coverage(risks[m], error, 0.9))
    accepted = ~s.reject
    out["trust"]["coverage_at_threshold"] = _r(accepted.mean())
    out["trust"]["risk_at_threshold"] = _r(error[accepted].mean()) if accepted.any() else 0.0
    out["composition"] = {g: int((kind == g).sum()) for g in shares}
    out["description"] = (
        "clean test inputs + corrupted, attacked (successful) and foreign inputs drawn evenly "
        "from every family; each scored by the trust model fitted without its family; "
        "error = wrong prediction")
    out["n"] = int(len(error))
    out["error_rate"] = _r(error.mean())
    out["held_out"] = True
    out["best_aurc_peer"] = min((m for m in BASELINES if m in out),
                                key=lambda m: out[m]["aurc"])
    reason = np.array(s.reason)
    out["reason_precision"] = reason_precision(reason, kind, error)
    return out


def reason_precision(reason: np.ndarray, kind: np.ndarray, error: np.ndarray) -> dict:
    """For each reject reason: how many inputs got it and the share whose true kind matches
    (``misclassification-like``: a clean input that is wrong; ``adversarial-like``: a
    successful attack; ``unfamiliar``: a corrupted or foreign input)."""
    out: dict = {}
    for r in REASON_KINDS[1:]:
        mask = reason == r
        if r == "misclassification-like":
            match = (kind == "clean") & error
        else:
            match = np.array([TRUE_KIND[k] == r for k in kind], bool)
        out[r] = {"n": int(mask.sum()),
                  "precision": _r(match[mask].mean()) if mask.any() else None}
    return out




def summary_table(metrics: dict) -> list[dict]:
    """One row per task: trust's AUROC (and mixed: AURC) against the best standard peer."""
    rows = []

    def add(task: str, sec: dict, key: str = "auroc") -> None:
        if "best_peer" not in sec:
            return
        if key == "aurc":
            peer = sec["best_aurc_peer"]
            margin = sec["trust"]["aurc"] - sec[peer]["aurc"]
        else:
            peer, margin = sec["best_peer"], sec["margin"]
        rows.append({"task": task, "metric": key, "trust": sec["trust"][key],
                     "trust_ci95": sec["trust"]["ci95" if key == "auroc" else "aurc_ci95"],
                     "best_peer": peer, "peer": sec[peer][key],
                     "peer_ci95": sec[peer]["ci95" if key == "auroc" else "aurc_ci95"],
                     "margin": _r(margin), "margin_ci95": sec.get("margin_ci95")
                     if key == "auroc" else None, "held_out": sec.get("held_out")})

    add("misclassification (clean)", metrics["misclassification"])
    for k, sec in metrics.get("shift", {}).items():
        add(f"wrong vs right under {k}", sec)
    for k, sec in metrics.get("adversarial", {}).items():
        add(f"attack {k}", sec)
    for k, sec in metrics.get("foreign", {}).items():
        add(f"foreign {k}", sec)
    if "mixed" in metrics:
        add("mixed stream", metrics["mixed"], "aurc")
    return rows
