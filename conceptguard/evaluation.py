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
    bootstrap_pvalue,
    cluster_bootstrap_blocks,
    fpr_at_tpr,
    holm,
    interval,
    risk_at_coverage,
    weighted_aurc,
    weighted_auroc,
)
from conceptguard.scoring import OUR_METHODS, REASON_KINDS, Scores, method_risks


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
    source: np.ndarray | None = None  # source image ids (None: each input its own)

    @property
    def wrong(self) -> np.ndarray:
        return self.scores.predictions != self.labels

    @property
    def clusters(self) -> np.ndarray:
        """The bootstrap clusters: source image ids (variants of one image share one)."""
        return np.arange(len(self.labels)) if self.source is None else np.asarray(self.source)


HEAD_METHODS: tuple[str, ...] = tuple(m for m in OUR_METHODS if m.startswith("head_"))
NONINFERIORITY = 0.005  # a head "matches" a detector when its AUROC trails by less than this


def compare(risks: dict[str, np.ndarray], positive: np.ndarray, *, resamples: int, seed: int,
            clusters: np.ndarray | None = None, aurc_error: np.ndarray | None = None,
            comparator: str | None = None) -> dict:
    """AUROC (and AURC against ``aurc_error`` when given) of every method, each with its
    interval from a bootstrap clustered by ``clusters`` (source image ids: an image and its
    variants are resampled together; None: every input its own cluster), plus:

    - ``best_peer``: the standard detector with the highest AUROC on this task (chosen on
      the test data), and trust's paired ``margin`` over it;
    - ``comparator``: the standard detector chosen for this task's family on the calibration
      stream (``comparator`` when given and a peer, else the best peer);
    - per head, its paired margin against both (``heads``), the ``best_head`` and the
      one-sided bootstrap p-value ``p_head_behind`` of "the best head trails the comparator
      by ``NONINFERIORITY`` or more" (Holm-adjusted across tasks by :func:`summary_table`).
    """
    n = len(positive)
    clusters = np.arange(n) if clusters is None else np.asarray(clusters)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in risks}
    aurc_parts: dict[str, list[np.ndarray]] = {m: [] for m in risks}
    # resamples in blocks of bounded size (the same draws as one (resamples, n) matrix)
    for counts in cluster_bootstrap_blocks(clusters, resamples, seed):
        for m, s in risks.items():
            parts[m].append(weighted_auroc(s, positive, counts))
            if aurc_error is not None:
                aurc_parts[m].append(weighted_aurc(s, aurc_error, counts))
    full = np.ones((1, n))
    out: dict = {}
    boot: dict[str, np.ndarray] = {m: np.concatenate(p) for m, p in parts.items()}
    for m, s in risks.items():
        point = float(weighted_auroc(s, positive, full)[0])
        entry = {"auroc": _r(point), "ci95": _ci(boot[m])}
        if aurc_error is not None:
            entry["aurc"] = _r(weighted_aurc(s, aurc_error, full)[0])
            entry["aurc_ci95"] = _ci(np.concatenate(aurc_parts[m]))
        out[m] = entry
    out["resamples"] = int(resamples)
    out["clusters"] = int(len(np.unique(clusters)))
    peers = [m for m in BASELINES if m in out and np.isfinite(out[m]["auroc"])]
    if not peers or "trust" not in out:
        return out
    best = max(peers, key=lambda m: out[m]["auroc"])
    comp = comparator if comparator in peers else best
    out["best_peer"] = best
    out["margin"] = _r(out["trust"]["auroc"] - out[best]["auroc"])
    out["margin_ci95"] = _ci(boot["trust"] - boot[best])
    out["comparator"] = comp
    out["comparator_from"] = ("calibration stream" if comparator in peers
                              else "test data (no calibration choice)")
    out["trust_vs_comparator"] = _r(out["trust"]["auroc"] - out[comp]["auroc"])
    out["trust_vs_comparator_ci95"] = _ci(boot["trust"] - boot[comp])
    heads = [h for h in HEAD_METHODS if h in out]
    if heads:
        out["heads"] = {h: {
            "vs_comparator": _r(out[h]["auroc"] - out[comp]["auroc"]),
            "vs_comparator_ci95": _ci(boot[h] - boot[comp]),
            "vs_best_peer": _r(out[h]["auroc"] - out[best]["auroc"]),
            "vs_best_peer_ci95": _ci(boot[h] - boot[best])} for h in heads}
        bh = max(heads, key=lambda h: out[h]["auroc"])
        out["best_head"] = bh
        out["p_head_behind"] = _r(bootstrap_pvalue(boot[bh] - boot[comp], -NONINFERIORITY))
    return out


def aurc_comparison(risks: dict[str, np.ndarray], error: np.ndarray, clusters: np.ndarray, *,
                    resamples: int, seed: int) -> dict:
    """Risk-coverage of every method on a stream (AURC, lower is better, with its clustered
    bootstrap interval) and trust's paired AURC difference against every standard detector
    (``trust_minus.<peer>``: the difference, its interval and the one-sided p-value of
    "trust is not lower"); ``p_not_lowest``: the largest of those p-values (trust is
    lowest against every peer only if each test rejects: an intersection-union test)."""
    parts: dict[str, list[np.ndarray]] = {m: [] for m in risks}
    for counts in cluster_bootstrap_blocks(clusters, resamples, seed):
        for m, s in risks.items():
            parts[m].append(weighted_aurc(s, error, counts))
    boot = {m: np.concatenate(p) for m, p in parts.items()}
    full = np.ones((1, len(error)))
    out: dict = {m: {"aurc": _r(weighted_aurc(s, error, full)[0]), "aurc_ci95": _ci(boot[m])}
                 for m, s in risks.items()}
    peers = [m for m in BASELINES if m in out]
    if "trust" in out and peers:
        minus = {}
        for m in peers:
            d = boot["trust"] - boot[m]
            minus[m] = {"diff": _r(out["trust"]["aurc"] - out[m]["aurc"]), "ci95": _ci(d),
                        "p": _r(bootstrap_pvalue(-d, 0.0))}
        out["trust_minus"] = minus
        out["best_aurc_peer"] = min(peers, key=lambda m: out[m]["aurc"])
        out["p_not_lowest"] = max(v["p"] for v in minus.values())
        out["lowest_everywhere"] = all(v["ci95"][1] < 0 for v in minus.values())
    out["resamples"] = int(resamples)
    out["clusters"] = int(len(np.unique(clusters)))
    return out


def misclassification_section(clean: Scores, labels: np.ndarray, *, resamples: int,
                              seed: int, comparator: str | None = None) -> dict:
    wrong = clean.predictions != labels
    risks = method_risks(clean)
    out = compare(risks, wrong, resamples=resamples, seed=seed, aurc_error=wrong,
                  comparator=comparator)
    for m in risks:
        out[m]["fpr_at_95tpr"] = _r(fpr_at_tpr(risks[m], wrong, 0.95))
    out["paper_rule"]["decision_accuracy"] = _r((clean.paper_rule_reject == wrong).mean())
    out["paper_rule"]["reject_rate"] = _r(clean.paper_rule_reject.mean())
    out["trust"]["decision_accuracy"] = _r((clean.reject == wrong).mean())
    out.update(n=int(len(labels)), n_wrong=int(wrong.sum()), held_out=True)
    return out


def _reason_counts(s: Scores) -> dict[str, int]:
    return {k: int(sum(r == k for r in s.reason)) for k in REASON_KINDS}


def shift_section(ev: EvalSet, *, resamples: int, seed: int, comparator: str | None = None
                  ) -> dict:
    """Wrong vs. right predictions under a corruption, and what the threshold does there."""
    s, wrong = ev.scores, ev.wrong
    out = compare(method_risks(s), wrong, resamples=resamples, seed=seed, aurc_error=wrong,
                  clusters=ev.clusters, comparator=comparator)
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
                        resamples: int, seed: int, comparator: str | None = None) -> dict:
    """Clean correct inputs (negatives) vs. successful adversarial inputs (positives); an
    attacked image and its clean original (test index = source id) share a cluster."""
    correct = clean.predictions == labels
    adv = ev.scores
    r_clean, r_adv = method_risks(clean), method_risks(adv)
    risks = {m: np.concatenate([r_clean[m][correct], r_adv[m]]) for m in r_clean}
    positive = np.r_[np.zeros(int(correct.sum()), bool), np.ones(len(adv), bool)]
    clusters = np.r_[np.flatnonzero(correct), ev.clusters]
    out = compare(risks, positive, resamples=resamples, seed=seed, clusters=clusters,
                  comparator=comparator) if len(adv) else {}
    if len(adv):
        out["trust"]["detection_rate_at_threshold"] = _r(adv.reject.mean())
        out["paper_rule"]["detection_rate"] = _r(adv.paper_rule_reject.mean())
        out["reasons"] = _reason_counts(adv)
    out.update(attempted=int(attempted), successful=int(len(adv)),
               success_rate=_r(len(adv) / max(attempted, 1)), held_out=ev.held_out)
    return out


def foreign_section(clean: EvalSet, ev: EvalSet, *, resamples: int, seed: int,
                    comparator: str | None = None) -> dict:
    """Clean test inputs (negatives) vs. a foreign set (positives: never right)."""
    r_clean, r_f = method_risks(clean.scores), method_risks(ev.scores)
    risks = {m: np.concatenate([r_clean[m], r_f[m]]) for m in r_clean}
    positive = np.r_[np.zeros(len(clean.labels), bool), np.ones(len(ev.scores), bool)]
    clusters = np.r_[clean.clusters, ev.clusters]
    out = compare(risks, positive, resamples=resamples, seed=seed, clusters=clusters,
                  comparator=comparator)
    out["trust"]["detection_rate_at_threshold"] = _r(ev.scores.reject.mean())
    out.update(n=int(len(ev.scores)), n_clean=int(len(clean.labels)), held_out=ev.held_out,
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

COMPOSITIONS: dict[str, dict[str, float]] = {
    "clean_heavy": {"clean": 0.90, "corruption": 0.05, "attack": 0.03, "foreign": 0.02},
    "shift_heavy": {"clean": 0.40, "corruption": 0.50, "attack": 0.05, "foreign": 0.05},
    "attack_heavy": {"clean": 0.40, "corruption": 0.05, "attack": 0.50, "foreign": 0.05},
    "foreign_heavy": {"clean": 0.40, "corruption": 0.05, "attack": 0.05, "foreign": 0.50},
}
"""Traffic mixes trust's risk-coverage claim is checked on (shares of clean, corrupted,
successfully attacked and foreign inputs)."""


@dataclass(frozen=True)
class Drawn:
    """A labelled stream drawn from evaluation sets."""

    scores: Scores
    error: np.ndarray  # wrong prediction
    kind: np.ndarray  # clean | corruption | attack | foreign
    source: np.ndarray  # bootstrap clusters (source image ids)


def draw_stream(sets: list[EvalSet], counts: dict[str, int], seed: int) -> Drawn:
    """``counts[group]`` inputs of each group, drawn evenly (seeded, without replacement)
    from that group's sets; a set smaller than its share gives all it has."""
    rng = np.random.default_rng(seed)
    parts: list[Scores] = []
    errors, kinds, sources = [], [], []
    for group, n in counts.items():
        members = [e for e in sets if e.group == group and len(e.scores)]
        if not members or n == 0:
            continue
        per = int(np.ceil(n / len(members)))
        for e in members:
            pick = np.sort(rng.choice(len(e.scores), size=min(per, len(e.scores)),
                                      replace=False))
            parts.append(e.scores.rows(pick))
            errors.append(e.wrong[pick])
            sources.append(e.clusters[pick])
            kinds += [group] * len(pick)
    return Drawn(Scores.concat(parts), np.concatenate(errors), np.array(kinds),
                 np.concatenate(sources))


def mixed_section(sets: list[EvalSet], shares: dict[str, int], *, resamples: int,
                  seed: int) -> dict:
    """A labelled stream: ``shares[group]`` inputs of each group, drawn evenly (seeded)
    from that group's sets, each scored by the model that never saw its family. An input is
    an error when its prediction is wrong. AURC of every method with trust's paired
    difference against every peer, and the precision of each reject reason."""
    d = draw_stream(sets, shares, seed)
    s, error, kind = d.scores, d.error, d.kind
    risks = method_risks(s)
    out = compare(risks, error, resamples=resamples, seed=seed, aurc_error=error,
                  clusters=d.source)
    rc = aurc_comparison(risks, error, d.source, resamples=resamples, seed=seed)
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
    for k in ("trust_minus", "best_aurc_peer", "p_not_lowest", "lowest_everywhere"):
        out[k] = rc[k]
    out["reason_precision"] = reason_precision(np.array(s.reason), kind, error)
    return out


def composition_sections(sets: list[EvalSet], size: int, *, resamples: int, seed: int,
                         compositions: dict[str, dict[str, float]] | None = None) -> dict:
    """``mixed_compositions``: for each traffic mix, ``size`` inputs drawn by its shares
    (:func:`draw_stream`), every method's AURC with its clustered interval and trust's paired
    difference against every peer (:func:`aurc_comparison`), the reject reasons' precision."""
    out: dict = {}
    for i, (name, mix) in enumerate((compositions or COMPOSITIONS).items()):
        counts = {g: int(round(share * size)) for g, share in mix.items()}
        d = draw_stream(sets, counts, seed + 1 + i)
        risks = method_risks(d.scores)
        sec = aurc_comparison(risks, d.error, d.source, resamples=resamples, seed=seed + i)
        accepted = ~d.scores.reject
        sec["trust"]["coverage_at_threshold"] = _r(accepted.mean())
        sec["trust"]["risk_at_threshold"] = (_r(d.error[accepted].mean()) if accepted.any()
                                             else 0.0)
        sec.update(shares=mix, composition={g: int((d.kind == g).sum()) for g in mix},
                   n=int(len(d.error)), error_rate=_r(d.error.mean()),
                   reason_precision=reason_precision(np.array(d.scores.reason), d.kind,
                                                     d.error))
        out[name] = sec
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


TASK_SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("shift", "corruption", "wrong vs right under {}"),
    ("adversarial", "attack", "attack {}"),
    ("foreign", "foreign", "foreign {}"),
)


def summary_table(metrics: dict) -> list[dict]:
    """One row per task: trust, every head and the best head against the best standard
    detector on the test data and against the comparator chosen on the calibration stream,
    with paired intervals; ``p_head_behind_holm``: Holm's adjustment across tasks of the
    p-value that the best head trails the comparator by ``NONINFERIORITY`` or more."""
    rows = []

    def add(task: str, kind: str, sec: dict) -> None:
        if "best_peer" not in sec:
            return
        peer, comp = sec["best_peer"], sec["comparator"]
        row = {"task": task, "kind": kind, "metric": "auroc",
               "trust": sec["trust"]["auroc"], "trust_ci95": sec["trust"]["ci95"],
               "best_peer": peer, "peer": sec[peer]["auroc"], "peer_ci95": sec[peer]["ci95"],
               "margin": sec["margin"], "margin_ci95": sec["margin_ci95"],
               "comparator": comp, "comparator_from": sec["comparator_from"],
               "comparator_auroc": sec[comp]["auroc"], "comparator_ci95": sec[comp]["ci95"],
               "trust_vs_comparator": sec["trust_vs_comparator"],
               "trust_vs_comparator_ci95": sec["trust_vs_comparator_ci95"],
               "held_out": sec.get("held_out")}
        if "best_head" in sec:
            bh = sec["best_head"]
            row.update(heads={h: sec[h]["auroc"] for h in sec["heads"]}, best_head=bh,
                       best_head_auroc=sec[bh]["auroc"], best_head_ci95=sec[bh]["ci95"],
                       head_vs_comparator=sec["heads"][bh]["vs_comparator"],
                       head_vs_comparator_ci95=sec["heads"][bh]["vs_comparator_ci95"],
                       head_vs_best_peer=sec["heads"][bh]["vs_best_peer"],
                       head_vs_best_peer_ci95=sec["heads"][bh]["vs_best_peer_ci95"],
                       p_head_behind=sec["p_head_behind"])
        rows.append(row)

    add("misclassification (clean)", "clean", metrics["misclassification"])
    for section, kind, fmt in TASK_SECTIONS:
        for k, sec in metrics.get(section, {}).items():
            add(fmt.format(k), kind, sec)
    adjusted = holm({r["task"]: r.get("p_head_behind", float("nan")) for r in rows})
    for r in rows:
        if "p_head_behind" in r:
            r["p_head_behind_holm"] = _r(adjusted[r["task"]])
    return rows


def stream_summary(metrics: dict) -> list[dict]:
    """One row per traffic mix (the mixed stream, then each composition): trust's AURC
    against the lowest peer's, the paired interval of the difference against every peer,
    and Holm's adjustment across the mixes of the p-value that trust is not the lowest."""
    streams = {"mixed stream": metrics["mixed"]} if "mixed" in metrics else {}
    streams.update({f"{k} composition": v
                    for k, v in metrics.get("mixed_compositions", {}).items()})
    rows = []
    for name, sec in streams.items():
        if "trust_minus" not in sec:
            continue
        peer = sec["best_aurc_peer"]
        worst = max(sec["trust_minus"].values(), key=lambda v: v["ci95"][1])
        rows.append({"stream": name, "n": sec["n"], "composition": sec["composition"],
                     "trust": sec["trust"]["aurc"], "trust_ci95": sec["trust"]["aurc_ci95"],
                     "best_peer": peer, "peer": sec[peer]["aurc"],
                     "peer_ci95": sec[peer]["aurc_ci95"],
                     "diff": sec["trust_minus"][peer]["diff"],
                     "diff_ci95": sec["trust_minus"][peer]["ci95"],
                     "largest_upper_bound": worst["ci95"][1],
                     "lowest_everywhere": sec["lowest_everywhere"],
                     "p_not_lowest": sec["p_not_lowest"]})
    adjusted = holm({r["stream"]: r["p_not_lowest"] for r in rows})
    for r in rows:
        r["p_not_lowest_holm"] = _r(adjusted[r["stream"]])
    return rows
