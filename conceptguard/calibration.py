"""Fit the monitor: detectors on the reference split, the trust model on a labelled fitting
stream built from the calibration split (clean, corrupted, attacked and foreign inputs), and
the reject threshold for a stated target, chosen on out-of-fold trust scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from conceptguard.detectors import (
    BASELINES,
    Detector,
    DetectorSettings,
    FitData,
    Outputs,
    detector_risks,
    fit_detectors,
)
from conceptguard.heads import fit_head, never_head
from conceptguard.heatmaps import Heatmaps
from conceptguard.metrics import auroc
from conceptguard.scoring import Monitor
from conceptguard.trust import (
    HEADS,
    TrustModel,
    design,
    evaluate_trust,
    hinge_knots,
    misclassification_columns,
)

GROUPS: tuple[str, ...] = ("clean", "corruption", "attack", "foreign")


class StreamShares(BaseModel):
    """The share of each kind of input in the weighted fitting stream: the prior the trust
    model assumes for what arrives. Within a kind, every family weighs the same."""

    model_config = ConfigDict(extra="forbid")

    clean: float = Field(0.55, gt=0)
    corruption: float = Field(0.2, ge=0)
    attack: float = Field(0.15, ge=0)
    foreign: float = Field(0.1, ge=0)


class DetectorConfig(BaseModel):
    """``knn_reference``: the size of KNN's reference set, a class-stratified subset of the
    reference split drawn with ``knn_seed`` (None, the default: the whole split, the
    standard detector). A subset makes the fused graph's KNN cheaper (a cosine product and
    a top-k over fewer columns) at a measured detection cost; see docs/trust.md."""

    model_config = ConfigDict(extra="forbid")

    knn_k: int = Field(10, ge=1)
    knn_reference: int | None = Field(None, ge=1)
    knn_seed: int = 0
    vim_dim: int | None = Field(None, ge=1)
    react_percentile: float = Field(0.9, gt=0, lt=1)

    def settings(self, shrinkage: float) -> DetectorSettings:
        return DetectorSettings(self.knn_k, self.vim_dim, self.react_percentile, shrinkage,
                                self.knn_reference, self.knn_seed)


class TrustVariant(BaseModel):
    """One way to fit the trust model. ``anomaly_target``: what the anomaly head calls a
    positive: a wrong prediction on an attacked or foreign input, or on any input that is
    not clean. ``misclassification_density``: the misclassification head also reads the
    density hinges. ``anomaly_l2``: its ridge penalty (small: a steep factor)."""

    model_config = ConfigDict(extra="forbid")

    anomaly_target: Literal["attack_or_foreign", "not_clean"] = "attack_or_foreign"
    misclassification_density: bool = False
    anomaly_l2: float = Field(1e-4, gt=0)

    @property
    def name(self) -> str:
        return (f"{self.anomaly_target}{'+density' if self.misclassification_density else ''}"
                f"/l2={self.anomaly_l2:g}")


def _default_variants() -> list[TrustVariant]:
    return [TrustVariant(anomaly_target=t, misclassification_density=d)
            for t in ("attack_or_foreign", "not_clean") for d in (False, True)]


class CalibrationSpec(BaseModel):
    """``accept_correct``: accept at least ``value`` of the correct clean predictions.
    ``max_risk``: the largest coverage whose weighted error rate among accepted inputs of the
    fitting stream is at most ``value``. Both on out-of-fold trust scores."""

    model_config = ConfigDict(extra="forbid")

    target: Literal["accept_correct", "max_risk"] = "accept_correct"
    value: float = Field(0.95, gt=0.0, lt=1.0)
    l2: float = 1e-2
    shrinkage: float = 1e-3
    folds: int = Field(5, ge=2)
    shares: StreamShares = Field(default_factory=StreamShares)
    detectors: DetectorConfig = Field(default_factory=DetectorConfig)
    variants: list[TrustVariant] = Field(default_factory=_default_variants, min_length=1)


@dataclass(frozen=True)
class Batch:
    """Classifier outputs for a set of inputs with labels (-1: foreign, no right answer) and,
    for a stream, each input's kind (``group``), ``family`` and ``source`` image id."""

    logits: np.ndarray
    features: np.ndarray
    concepts: np.ndarray
    labels: np.ndarray
    group: np.ndarray = field(default=None)  # type: ignore[assignment]
    family: np.ndarray = field(default=None)  # type: ignore[assignment]
    source: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.group is None:
            object.__setattr__(self, "group", np.full(n, "clean", dtype=object))
        if self.family is None:
            object.__setattr__(self, "family", np.asarray(self.group, dtype=object).copy())
        if self.source is None:
            object.__setattr__(self, "source", np.arange(n, dtype=np.int64))

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(1)

    @property
    def wrong(self) -> np.ndarray:
        return self.predictions != self.labels

    @property
    def outputs(self) -> Outputs:
        return Outputs(self.logits, self.features, self.concepts)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, mask: np.ndarray) -> Batch:
        return Batch(*(getattr(self, f)[mask] for f in _FIELDS))

    def tagged(self, group: str, family: str, source: np.ndarray | None = None) -> Batch:
        n = len(self)
        return Batch(self.logits, self.features, self.concepts, self.labels,
                     np.full(n, group, dtype=object), np.full(n, family, dtype=object),
                     self.source if source is None else np.asarray(source, np.int64))

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        return Batch(*(np.concatenate([getattr(b, f) for b in batches]) for f in _FIELDS))


_FIELDS = ("logits", "features", "concepts", "labels", "group", "family", "source")


def stream_weights(group: np.ndarray, family: np.ndarray, shares: StreamShares
                   ) -> np.ndarray:
    """Sample weights (mean 1) giving each kind its share and each family within a kind the
    same weight; kinds absent from the stream drop out and the rest are renormalised."""
    share = shares.model_dump()
    present = [g for g in GROUPS if (group == g).any() and share[g] > 0]
    total = sum(share[g] for g in present)
    w = np.zeros(len(group))
    for g in present:
        in_g = group == g
        fams = np.unique(family[in_g])
        for f in fams:
            rows = in_g & (family == f)
            w[rows] = share[g] / total / len(fams) / rows.sum()
    return w * len(w) / max(w.sum(), 1e-12)


def fit_trust_model(x: np.ndarray, stream: Batch, knots: np.ndarray, spec: CalibrationSpec,
                    variant: TrustVariant | None = None) -> TrustModel:
    """Fit the four heads on the stream's design matrix ``x`` (see :mod:`conceptguard.trust`
    for what each head estimates)."""
    v = variant or spec.variants[0]
    w = stream_weights(stream.group, stream.family, spec.shares)
    wrong = stream.wrong
    familiar = np.isin(stream.group, ["clean", "corruption"])
    attack = stream.group == "attack"
    if v.anomaly_target == "attack_or_foreign":
        anomalous = wrong & np.isin(stream.group, ["attack", "foreign"])
    else:
        anomalous = wrong & (stream.group != "clean")
    kind_rows = ~(attack & ~wrong)  # a failed attack is neither clean nor a defect
    cols = misclassification_columns(v.misclassification_density)
    heads = {
        "misclassification": fit_head(x[familiar][:, cols], wrong[familiar], spec.l2,
                                      w[familiar]),
        "anomaly": fit_head(x, anomalous, v.anomaly_l2, w),
        # no attacked inputs (a classifier without gradients): a head that never fires
        "adversarial": (fit_head(x[kind_rows], attack[kind_rows], spec.l2, w[kind_rows])
                        if attack[kind_rows].any() else never_head(x)),
        "unfamiliar": fit_head(x[kind_rows], np.isin(stream.group[kind_rows],
                                                     ["corruption", "foreign"]),
                               spec.l2, w[kind_rows]),
    }
    assert set(heads) == set(HEADS)
    return TrustModel(knots, heads, cols)


def fold_of(source: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold per input such that all variants of one source image share it."""
    ids, inverse = np.unique(source, return_inverse=True)
    assign = np.random.default_rng(seed).permutation(len(ids)) % folds
    return assign[inverse]


def out_of_fold_trust(x: np.ndarray, stream: Batch, knots: np.ndarray, spec: CalibrationSpec,
                      risks: dict[str, np.ndarray], seed: int,
                      variant: TrustVariant | None = None) -> np.ndarray:
    """Each input's trust from a model fitted on the other folds (cross-fitting)."""
    fold = fold_of(stream.source, spec.folds, seed)
    trust = np.empty(len(stream))
    for k in range(spec.folds):
        test = fold == k
        model = fit_trust_model(x[~test], stream.select(~test), knots, spec, variant)
        part = {n: r[test] for n, r in risks.items()}
        trust[test] = evaluate_trust(model, part, 0.0).trust
    return trust


def weighted_error_at(trust: np.ndarray, bad: np.ndarray, weights: np.ndarray,
                      threshold: float) -> float:
    accepted = trust >= threshold
    return float((bad * weights)[accepted].sum() / max(weights[accepted].sum(), 1e-12))


def choose_threshold(trust: np.ndarray, bad: np.ndarray, weights: np.ndarray,
                     correct_clean: np.ndarray, spec: CalibrationSpec) -> float:
    """Reject when trust < threshold; see :class:`CalibrationSpec` for the targets."""
    if spec.target == "accept_correct":
        t = np.sort(trust[correct_clean])
        k = int(np.floor((1 - spec.value) * len(t)))
        return float(t[k]) if len(t) else 0.0
    order = np.argsort(-trust, kind="mergesort")
    cum_bad = np.cumsum((bad * weights)[order])
    cum_w = np.cumsum(weights[order])
    ok = np.flatnonzero(cum_bad / np.maximum(cum_w, 1e-12) <= spec.value)
    if len(ok) == 0:
        return float(trust.max() + 1e-9)
    return float(trust[order][ok[-1]])


@dataclass(frozen=True)
class FittedMonitor:
    monitor: Monitor
    info: dict
    stream_risks: dict[str, np.ndarray]  # every detector's risk on the fitting stream
    design: np.ndarray  # the stream's design matrix
    variant: TrustVariant


def fit_detector_bank(reference: Batch, heatmaps: Heatmaps, spec: CalibrationSpec
                      ) -> dict[str, Detector]:
    c = heatmaps.ok.shape[0]
    return fit_detectors(FitData(reference.outputs, reference.labels, c, heatmaps.ok,
                                 heatmaps.bad, heatmaps.adv,
                                 spec.detectors.settings(spec.shrinkage)))


def task_auroc(risk: np.ndarray, stream: Batch, rows: np.ndarray, clean_risk: np.ndarray
               ) -> float:
    """AUROC of a family's task on the stream, as the evaluation defines it: wrong vs. right
    within a corruption (or within the clean inputs); successful attacks vs. clean correct
    inputs; foreign vs. clean inputs. ``clean_risk`` scores the clean rows."""
    group = stream.group[rows][0]
    if group in ("clean", "corruption"):
        return auroc(risk, stream.wrong[rows])
    clean_wrong = stream.wrong[stream.group == "clean"]
    neg = ~clean_wrong if group == "attack" else np.ones(len(clean_wrong), bool)
    pos = stream.wrong[rows] if group == "attack" else np.ones(int(rows.sum()), bool)
    return auroc(np.r_[risk[pos], clean_risk[neg]],
                 np.r_[np.ones(int(pos.sum()), bool), np.zeros(int(neg.sum()), bool)])


def select_variant(x: np.ndarray, stream: Batch, risks: dict[str, np.ndarray],
                   knots: np.ndarray, spec: CalibrationSpec, seed: int
                   ) -> tuple[TrustVariant, dict]:
    """The variant whose trust trails the strongest standard detector least on the stream's
    tasks (clean misclassification out of fold; every other family left out of the fit that
    scores it), weighting each kind of input by its share of the stream. Only calibration
    data is used."""
    clean = stream.group == "clean"
    families = [f for f in np.unique(stream.family[~clean])]
    peers = {}
    for f in ["clean", *families]:
        rows = stream.family == f
        peers[f] = max(task_auroc(risks[m][rows], stream, rows, risks[m][clean])
                       for m in BASELINES)
    table: dict[str, dict[str, float]] = {}
    for v in spec.variants:
        oof = 1.0 - out_of_fold_trust(x, stream, knots, spec, risks, seed, v)
        gaps = {"clean": task_auroc(oof[clean], stream, clean, oof[clean]) - peers["clean"]}
        for f in families:
            rows = stream.family == f
            model = fit_trust_model(x[~rows], stream.select(~rows), knots, spec, v)
            part = {n: r[rows] for n, r in risks.items()}
            risk = 1.0 - evaluate_trust(model, part, 0.0).trust
            gaps[f] = task_auroc(risk, stream, rows, oof[clean]) - peers[f]
        table[v.name] = {k: round(float(g), 4) for k, g in gaps.items()}
        table[v.name]["score"] = round(_share_weighted(gaps, stream, spec.shares), 4)
    best = max(spec.variants, key=lambda v: table[v.name]["score"])
    return best, {"criterion": "trust's AUROC minus the strongest standard detector's on each "
                               "task of the calibration stream (every family left out of the "
                               "fit that scores it; clean out of fold), averaged within each "
                               "kind and weighted by the kind's share of the stream",
                  "chosen": best.name, "gaps": table}


def _share_weighted(gaps: dict[str, float], stream: Batch, shares: StreamShares) -> float:
    share = shares.model_dump()
    by_group: dict[str, list[float]] = {}
    for fam, g in gaps.items():
        group = str(stream.group[stream.family == fam][0])
        by_group.setdefault(group, []).append(g)
    total = sum(share[k] for k in by_group)
    return float(sum(share[k] * np.mean(v) for k, v in by_group.items()) / total)


def _fit_with_threshold(x: np.ndarray, stream: Batch, risks: dict[str, np.ndarray],
                        knots: np.ndarray, spec: CalibrationSpec, seed: int,
                        variant: TrustVariant) -> tuple[TrustModel, float, np.ndarray]:
    model = fit_trust_model(x, stream, knots, spec, variant)
    oof = out_of_fold_trust(x, stream, knots, spec, risks, seed, variant)
    weights = stream_weights(stream.group, stream.family, spec.shares)
    correct_clean = (stream.group == "clean") & ~stream.wrong
    return model, choose_threshold(oof, stream.wrong, weights, correct_clean, spec), oof


def fit_monitor(reference: Batch, heatmaps: Heatmaps, stream: Batch, spec: CalibrationSpec,
                seed: int = 0) -> FittedMonitor:
    """Detectors on ``reference``; trust model (variant chosen on the stream) and threshold
    on the labelled ``stream``."""
    detectors = fit_detector_bank(reference, heatmaps, spec)
    knots = hinge_knots(detector_risks(detectors, reference.outputs))
    risks = detector_risks(detectors, stream.outputs)
    x = design(risks, knots)
    if len(spec.variants) > 1:
        variant, selection = select_variant(x, stream, risks, knots, spec, seed)
    else:
        variant, selection = spec.variants[0], {"chosen": spec.variants[0].name}
    model, threshold, oof = _fit_with_threshold(x, stream, risks, knots, spec, seed, variant)
    weights = stream_weights(stream.group, stream.family, spec.shares)
    bad = stream.wrong
    accepted = oof >= threshold
    clean = stream.group == "clean"
    info = {
        "stream": {g: int((stream.group == g).sum()) for g in GROUPS},
        "families": {str(f): int((stream.family == f).sum())
                     for f in np.unique(stream.family)},
        "shares": spec.shares.model_dump(),
        "variant": variant.model_dump(),
        "variant_selection": selection,
        "threshold": threshold,
        "threshold_from": "out-of-fold trust scores",
        "folds": spec.folds,
        "calibration_coverage_clean": float(accepted[clean].mean()),
        "calibration_accept_correct": float(accepted[clean & ~bad].mean()),
        "calibration_weighted_risk_at_threshold": weighted_error_at(oof, bad, weights,
                                                                    threshold),
    }
    return FittedMonitor(Monitor(detectors, model, threshold), info, risks, x, variant)


def refit_without(fitted: FittedMonitor, stream: Batch, family: str, spec: CalibrationSpec,
                  seed: int = 0) -> Monitor:
    """The monitor refitted (trust model and threshold, same variant; the detectors are
    fitted on the reference split and never see the stream) on the stream without
    ``family``: what scores that family in a leave-one-family-out evaluation."""
    keep = stream.family != family
    sub = stream.select(keep)
    risks = {k: v[keep] for k, v in fitted.stream_risks.items()}
    model, threshold, _ = _fit_with_threshold(fitted.design[keep], sub, risks,
                                              fitted.monitor.trust_model.knots, spec, seed,
                                              fitted.variant)
    return Monitor(fitted.monitor.detectors, model, threshold)
