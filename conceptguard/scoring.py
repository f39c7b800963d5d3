"""The one scoring function shared by the offline evaluation and the online service.

Input: the classifier's logits, features and standardised concept scores for a batch.
Output: prediction, every detector's risk, the trust model's heads, ``trust`` (an estimate
of P(prediction is right)), the reject decision and its reason kind, the paper's rule, and
the concepts behind the decision.

The decision is made here too: the calibration map of trust (:class:`TrustMap`, fitted by
:mod:`conceptguard.trust_map`), ``reject = raw trust < threshold``, and the reject's reason,
named by the head that carries the evidence (:func:`reasons`): ``misclassification-like``
where ``p_misclassification >= p_anomaly``, else the larger kind head's kind. The trust
model's features and heads are defined in :mod:`conceptguard.trust`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from conceptguard.detectors import DETECTORS, Detector, Outputs, PaperRule, detector_risks
from conceptguard.heads import sigmoid
from conceptguard.trust import TrustModel, design


@dataclass(frozen=True)
class TrustMap:
    """The calibration map of trust, raw score -> P(right) (fitted by
    :mod:`conceptguard.trust_map`): ``x``: strictly increasing knots on the raw scale from 0
    to 1; ``y``: the calibrated values there, strictly increasing."""

    x: np.ndarray
    y: np.ndarray

    def __call__(self, raw: np.ndarray | float) -> np.ndarray:
        return np.interp(np.asarray(raw, np.float64), self.x, self.y)

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.x, self.y))


IDENTITY = TrustMap(np.array([0.0, 1.0]), np.array([0.0, 1.0]))

ReasonKind = Literal["accepted", "misclassification-like", "adversarial-like", "unfamiliar"]
REASON_KINDS: tuple[ReasonKind, ...] = ("accepted", "misclassification-like",
                                        "adversarial-like", "unfamiliar")
RejectReason = ReasonKind  # the name the service has used since v1


@dataclass(frozen=True)
class TrustResult:
    p: dict[str, np.ndarray]  # per head
    trust: np.ndarray
    reject: np.ndarray
    reason: list[ReasonKind]


def reasons(reject: np.ndarray, p_misclassification: np.ndarray, p_anomaly: np.ndarray,
            p_adversarial: np.ndarray, p_unfamiliar: np.ndarray) -> list[ReasonKind]:
    """The reject reason, named by the head that carries the evidence: trust's two factors
    are ``1 - p_misclassification`` and ``1 - p_anomaly``; where the anomaly head is the
    larger (its factor pulled trust down more), the kind heads say which anomaly
    (``adversarial-like`` when ``p_adversarial >= p_unfamiliar``, else ``unfamiliar``);
    otherwise the input is ``misclassification-like``."""
    kind = np.where(np.asarray(p_anomaly) <= p_misclassification, 1,
                    np.where(np.asarray(p_adversarial) >= p_unfamiliar, 2, 3))
    return [REASON_KINDS[i] for i in np.where(reject, kind, 0).tolist()]


def evaluate_trust(model: TrustModel, risks: dict[str, np.ndarray], threshold: float
                   ) -> TrustResult:
    logits = model.head_logits(design(risks, model.knots))
    p = {h: sigmoid(v) for h, v in logits.items()}
    trust = (1.0 - p["misclassification"]) * (1.0 - p["anomaly"])
    reject = trust < threshold
    return TrustResult(p, trust, reject, reasons(reject, p["misclassification"], p["anomaly"],
                                                 p["adversarial"], p["unfamiliar"]))


@dataclass(frozen=True)
class Monitor:
    """Everything scoring needs, loaded from the bank."""

    detectors: dict[str, Detector]
    trust_model: TrustModel
    threshold: float  # reject when the raw trust < threshold (the trust model's own scale)
    calibration: TrustMap = IDENTITY  # raw trust -> calibrated trust, strictly increasing

    @property
    def calibrated_threshold(self) -> float:
        """The threshold on the calibrated scale: ``trust < calibrated_threshold`` is the
        same decision as ``raw trust < threshold`` (the map is strictly increasing)."""
        return float(self.calibration(self.threshold))

    @property
    def heatmaps(self) -> PaperRule:
        rule = self.detectors[PaperRule.name]
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
    # the trust model's score before the calibration map (None: not kept, e.g. rebuilt
    # from stored columns); ``trust`` is the calibrated one
    raw_trust: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.trust)

    def rows(self, index: slice | Sequence[int] | np.ndarray) -> Scores:
        """The scores of some inputs: a slice gives views (no copy), indices or a boolean
        mask (one entry per input) copy."""
        if isinstance(index, slice):
            reason = self.reason[index]
        else:
            index = np.asarray(index)
            if index.dtype == bool:  # a mask, not 0/1 indices
                if index.shape != (len(self),):
                    raise ValueError(f"a boolean mask over {len(self)} inputs, got shape "
                                     f"{index.shape}")
                index = np.flatnonzero(index)
            index = index.astype(np.intp, copy=False)
            reason = [self.reason[i] for i in index.tolist()]
        return Scores(
            probabilities=self.probabilities[index], predictions=self.predictions[index],
            risks={name: r[index] for name, r in self.risks.items()},
            p_misclassification=self.p_misclassification[index],
            p_anomaly=self.p_anomaly[index], p_adversarial=self.p_adversarial[index],
            p_unfamiliar=self.p_unfamiliar[index], trust=self.trust[index],
            reject=self.reject[index], reason=reason,
            paper_rule_reject=self.paper_rule_reject[index],
            contributions=self.contributions[index],
            raw_trust=None if self.raw_trust is None else self.raw_trust[index])

    @staticmethod
    def concat(parts: Sequence[Scores]) -> Scores:
        """The scores of several batches (or rows), in order, as one. A per-row matrix
        (probabilities, contributions) that some parts hold with zero columns (dropped to
        save memory, as the offline job's streamed test split does) has zero columns in
        the result."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            raise ValueError("Scores.concat needs at least one part")

        def cat(name: str) -> np.ndarray:
            arrays = [getattr(p, name) for p in parts]
            if arrays[0].ndim == 2 and len({a.shape[1] for a in arrays}) > 1:
                return np.empty((sum(len(a) for a in arrays), 0), arrays[0].dtype)
            return np.concatenate(arrays)

        return Scores(
            probabilities=cat("probabilities"), predictions=cat("predictions"),
            risks={name: np.concatenate([p.risks[name] for p in parts])
                   for name in parts[0].risks},
            p_misclassification=cat("p_misclassification"), p_anomaly=cat("p_anomaly"),
            p_adversarial=cat("p_adversarial"), p_unfamiliar=cat("p_unfamiliar"),
            trust=cat("trust"), reject=cat("reject"),
            reason=[r for p in parts for r in p.reason],
            paper_rule_reject=cat("paper_rule_reject"), contributions=cat("contributions"),
            raw_trust=(None if any(p.raw_trust is None for p in parts)
                       else np.concatenate([p.raw_trust for p in parts])))


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
    """Score a batch. Shapes: ``logits (N,C)``, ``features (N,d)``, ``concepts (N,K)``.
    ``trust`` is the calibrated one (the bank's map applied to the trust model's score);
    the reject decision is made on the raw score against the raw threshold (the same
    decision as calibrated trust against :attr:`Monitor.calibrated_threshold`)."""
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
        trust=monitor.calibration(t.trust),
        reject=t.reject,
        reason=t.reason,
        paper_rule_reject=risks[PaperRule.name] > 0,
        contributions=concept_contributions(out, monitor.heatmaps),
        raw_trust=t.trust,
    )


def scores_from_graph(outputs: Mapping[str, np.ndarray], threshold: float,
                      calibration: TrustMap = IDENTITY) -> Scores:
    """:class:`Scores` from the outputs of the fused graph (``monitor.onnx``, names in
    :data:`conceptguard.graph.MONITOR_OUTPUTS`), without running :func:`score`.

    The graph computes in float32; the values are cast to the dtypes :func:`score` returns.
    ``reject`` and ``reason`` are recomputed here from the graph's trust and heads with
    ``threshold`` (the manifest's, as :func:`score` does), so that the bank's threshold
    stays the one source of the decision; the graph's own ``reject``/``reason`` outputs
    hold the threshold it was exported with. The graph's ``trust`` is the raw score (the
    graph does not hold the calibration map): ``calibration`` (the bank's,
    :attr:`Monitor.calibration`) maps it, as :func:`score` does."""
    f64 = functools.partial(np.asarray, dtype=np.float64)
    # one float64 copy, detector-major: each detector's risks are a contiguous row view
    risks = np.ascontiguousarray(np.asarray(outputs["risks"], np.float64).T)
    p_adv, p_unf = f64(outputs["p_adversarial"]), f64(outputs["p_unfamiliar"])
    trust = f64(outputs["trust"])
    reject = trust < threshold
    return Scores(
        probabilities=f64(outputs["probabilities"]),
        predictions=np.asarray(outputs["predictions"], dtype=np.int64),
        risks=dict(zip(DETECTORS, risks, strict=True)),
        p_misclassification=f64(outputs["p_misclassification"]),
        p_anomaly=f64(outputs["p_anomaly"]),
        p_adversarial=p_adv,
        p_unfamiliar=p_unf,
        trust=calibration(trust),
        reject=reject,
        reason=reasons(reject, f64(outputs["p_misclassification"]),
                       f64(outputs["p_anomaly"]), p_adv, p_unf),
        paper_rule_reject=np.asarray(outputs["paper_rule_reject"], dtype=bool),
        contributions=np.asarray(outputs["contributions"], dtype=np.float32),
        raw_trust=trust,
    )


GRAPH_TOLERANCE = 1e-4  # float32 graph vs float64 score(): trust, heads, probabilities
_COMPARED = ("probabilities", "p_misclassification", "p_anomaly", "p_adversarial",
             "p_unfamiliar")


def graph_tolerance(monitor: Monitor, logits: np.ndarray, features: np.ndarray,
                    concepts: np.ndarray, ref: Scores, ulps: float = 4.0,
                    factor: float = 64.0) -> float:
    """The tolerance of :func:`graph_disagreement` for this monitor on these inputs:
    :data:`GRAPH_TOLERANCE`, or ``factor`` times the largest change of the compared scores
    when every input moves by ``ulps`` float32 units (a seeded random sign each), whichever
    is larger. The float32 graph rounds its intermediate values by about that much, and the
    scores amplify it as they amplify a change of their inputs: a classifier with large
    logits or features, whose scores move by more than 1e-4 under float32 rounding, gets a
    tolerance that grows with it, while a graph exported from other tensors (errors of
    0.01 and more) is still refused."""
    rng = np.random.default_rng(0)
    step = ulps * float(np.finfo(np.float32).eps)

    def nudged(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float64)
        return a * (1.0 + step * rng.choice((-1.0, 1.0), a.shape))

    with np.errstate(all="ignore"):
        moved = score(monitor, nudged(logits), nudged(features), nudged(concepts))
    change = 0.0
    names = (*_COMPARED, "raw_trust" if ref.raw_trust is not None else "trust")
    for name in names:
        a, b = np.asarray(getattr(ref, name)), np.asarray(getattr(moved, name))
        if a.size and a.shape == b.shape:
            diff = np.abs(a - b)
            change = max(change, float(np.max(np.where(np.isfinite(diff), diff, 0.0))))
    return max(GRAPH_TOLERANCE, factor * change)


def graph_disagreement(ref: Scores, got: Scores, atol: float = GRAPH_TOLERANCE) -> str | None:
    """None when ``got`` (from the fused graph) matches ``ref`` (:func:`score` on the same
    inputs): predictions equal, probabilities, trust and the four heads within ``atol``;
    else what differs. Used on a probe batch when a bank with a fused graph is loaded or
    written, so a graph exported from other tensors is refused, not served. Trust is
    compared before the calibration map (``raw_trust`` where both hold it): the map's
    slope would scale the float32 rounding."""
    if not np.array_equal(ref.predictions, got.predictions):
        return "predictions differ"
    raw = ref.raw_trust is not None and got.raw_trust is not None
    for name in ("probabilities", "raw_trust" if raw else "trust", "p_misclassification",
                 "p_anomaly", "p_adversarial", "p_unfamiliar"):
        a, b = np.asarray(getattr(ref, name)), np.asarray(getattr(got, name))
        if a.shape != b.shape:
            return f"{name} has shape {b.shape}, expected {a.shape}"
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        if not err <= atol:
            return f"{name} differs by {err:.3g} (tolerance {atol:g})"
    return None


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
