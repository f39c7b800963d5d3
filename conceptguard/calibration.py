"""Fit the monitor: detectors on the reference split, the trust model on a labelled fitting
stream built from the calibration split (clean, corrupted, attacked and foreign inputs), and
the reject threshold for a stated target, chosen on out-of-fold trust scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model

from conceptguard.detectors import (
    BASELINES,
    Detector,
    DetectorSettings,
    FitData,
    Outputs,
    detector_risks,
    fit_detectors,
    settings_fields,
)
from conceptguard.heads import fit_head, never_head
from conceptguard.heatmaps import Heatmaps
from conceptguard.metrics import auroc
from conceptguard.operating_point import operating_curve
from conceptguard.scoring import Monitor, TrustMap, evaluate_trust
from conceptguard.trust import HEADS, TrustModel, design, hinge_knots, misclassification_columns
from conceptguard.trust_map import expected_calibration_error, fit_trust_map

GROUPS: tuple[str, ...] = ("clean", "corruption", "attack", "foreign")


class StreamShares(BaseModel):
    """The share of each kind of input in the weighted fitting stream: the prior the trust
    model assumes for what arrives. Within a kind, every family weighs the same."""

    model_config = ConfigDict(extra="forbid")

    clean: float = Field(0.55, gt=0)
    corruption: float = Field(0.2, ge=0)
    attack: float = Field(0.15, ge=0)
    foreign: float = Field(0.1, ge=0)


class _DetectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def settings(self, shrinkage: float) -> Any:
        """The detectors' settings (:data:`~conceptguard.detectors.DetectorSettings`): these
        fields by name, and the spec's covariance ``shrinkage``."""
        return DetectorSettings(shrinkage=shrinkage, **self.model_dump())


DetectorConfig: type[Any] = create_model(
    "DetectorConfig", __base__=_DetectorConfig, __module__=__name__,
    __doc__="The build config's ``calibration.detectors``: every detector's own settings, "
            "from the registry (:attr:`~conceptguard.detectors.Detector.own_settings`). "
            "``knn_reference``: the size of KNN's reference set, a class-stratified subset "
            "of the reference split drawn with ``knn_seed`` (None, the default: the whole "
            "split, the standard detector); ``knn_k`` names the neighbour on the whole "
            "split, and a subset scales it (:func:`~conceptguard.detectors.scaled_k`); see "
            "docs/trust.md.",
    **settings_fields())


class TrustVariant(BaseModel):
    """One way to fit the trust model. ``anomaly_target``: what the anomaly head calls a
    positive: a wrong prediction on an attacked or foreign input, or on any input that is
    not clean. ``misclassification_density``: the misclassification head also reads the
    density hinges. ``anomaly_l2``: its ridge penalty (small: a steep factor)."""

    model_config = ConfigDict(extra="forbid")

    anomaly_target: Literal["attack_or_foreign", "not_clean"] = "attack_or_foreign"
    misclassification_density: bool = False
    anomaly_l2: float = Field(1e-4, gt=0)
    # what the kind heads are fitted against: every other kind (``rest``) or clean inputs
    # only (``clean``: each head then ranks its own kind against clean traffic, the way its
    # detection tasks are posed)
    kind_negatives: Literal["rest", "clean"] = "rest"

    @property
    def name(self) -> str:
        kind = "" if self.kind_negatives == "rest" else "/kind-vs-clean"
        return (f"{self.anomaly_target}{'+density' if self.misclassification_density else ''}"
                f"/l2={self.anomaly_l2:g}{kind}")


def _default_variants() -> list[TrustVariant]:
    return [TrustVariant(anomaly_target=t, misclassification_density=d, kind_negatives=k)
            for t in ("attack_or_foreign", "not_clean") for d in (False, True)
            for k in ("rest", "clean")]


class CalibrationSpec(BaseModel):
    """``accept_correct``: accept at least ``value`` of the correct clean predictions, on new
    inputs of the same kind with probability ``confidence`` (an exact binomial bound on the
    out-of-fold scores of the correct clean inputs; 0.5: about the plain quantile).
    ``max_risk``: the largest coverage whose weighted error rate among accepted inputs of the
    fitting stream is at most ``value``. Both on out-of-fold trust scores."""

    model_config = ConfigDict(extra="forbid")

    target: Literal["accept_correct", "max_risk"] = "accept_correct"
    value: float = Field(0.95, gt=0.0, lt=1.0)
    confidence: float = Field(0.95, ge=0.5, lt=1.0)
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
    unfamiliar = np.isin(stream.group, ["corruption", "foreign"])
    clean = stream.group == "clean"
    if v.kind_negatives == "rest":
        adv_rows = unf_rows = kind_rows
    else:
        adv_rows, unf_rows = kind_rows & (clean | attack), clean | unfamiliar
    cols = misclassification_columns(v.misclassification_density)
    heads = {
        "misclassification": fit_head(x[familiar][:, cols], wrong[familiar], spec.l2,
                                      w[familiar]),
        "anomaly": fit_head(x, anomalous, v.anomaly_l2, w),
        # no attacked inputs (a classifier without gradients): a head that never fires
        "adversarial": (fit_head(x[adv_rows], attack[adv_rows], spec.l2, w[adv_rows])
                        if attack[adv_rows].any() else never_head(x)),
        "unfamiliar": fit_head(x[unf_rows], unfamiliar[unf_rows], spec.l2, w[unf_rows]),
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
        if not len(t):
            return 0.0
        return float(t[accept_index(len(t), spec.value, spec.confidence)])
    order = np.argsort(-trust, kind="mergesort")
    cum_bad = np.cumsum((bad * weights)[order])
    cum_w = np.cumsum(weights[order])
    ok = np.flatnonzero(cum_bad / np.maximum(cum_w, 1e-12) <= spec.value)
    if len(ok) == 0:
        return float(trust.max() + 1e-9)
    return float(trust[order][ok[-1]])


def accept_index(n: int, value: float, confidence: float) -> int:
    """The 0-based index ``k`` into ``n`` sorted scores of correct inputs such that the
    threshold ``t[k]`` accepts at least ``value`` of new exchangeable correct inputs with
    probability at least ``confidence``, the largest such ``k`` (the strictest threshold).

    The share of new inputs at or above the (k+1)-th smallest of ``n`` scores is
    Beta(n - k, k + 1), and P(Beta(n - k, k + 1) >= value) = P(Binomial(n, value) <= n-k-1).
    With ``confidence`` 0.5 this is about ``floor((1 - value) * n)``; 0 when no ``k``
    qualifies (accept every score seen)."""
    from scipy.stats import binom

    ks = np.arange(n)
    ok = binom.cdf(n - ks - 1, n, value) >= confidence
    return int(ks[ok].max()) if ok.any() else 0


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


def choose_comparators(stream: Batch, risks: dict[str, np.ndarray]) -> dict[str, str]:
    """The standard detector each task is compared with, chosen on the calibration stream
    (never on test data): per family, the detector with the highest AUROC on that family's
    task (:func:`task_auroc`); ``<kind>`` keys (``corruption``, ``attack``, ``foreign``)
    hold the detector with the highest mean AUROC over the kind's families, the comparator
    of a test family the stream does not hold (an unseen attack or foreign set)."""
    clean = stream.group == "clean"
    per_family: dict[str, dict[str, float]] = {}
    for f in np.unique(stream.family):
        rows = stream.family == f
        per_family[str(f)] = {m: task_auroc(risks[m][rows], stream, rows, risks[m][clean])
                              for m in BASELINES}
    out = {f: max(a, key=lambda m: a[m]) for f, a in per_family.items()}
    for g in GROUPS[1:]:
        fams = [f for f in per_family if stream.group[stream.family == f][0] == g]
        if fams:
            mean = {m: float(np.mean([per_family[f][m] for f in fams])) for m in BASELINES}
            out[g] = max(mean, key=lambda m: mean[m])
    return out


def _method_risks(model: TrustModel, risks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Trust's risk ``1 - trust`` and every head's probability (the evaluation's names)."""
    t = evaluate_trust(model, risks, 0.0)
    return {"trust": 1.0 - t.trust, **{f"head_{h}": t.p[h] for h in HEADS}}


def out_of_fold_methods(x: np.ndarray, stream: Batch, knots: np.ndarray,
                        spec: CalibrationSpec, risks: dict[str, np.ndarray], seed: int,
                        variant: TrustVariant | None = None) -> dict[str, np.ndarray]:
    """:func:`_method_risks` of each input from a model fitted on the other folds."""
    fold = fold_of(stream.source, spec.folds, seed)
    out: dict[str, np.ndarray] = {}
    for k in range(spec.folds):
        test = fold == k
        model = fit_trust_model(x[~test], stream.select(~test), knots, spec, variant)
        for m, v in _method_risks(model, {n: r[test] for n, r in risks.items()}).items():
            out.setdefault(m, np.empty(len(stream)))[test] = v
    return out


def lofo_table(x: np.ndarray, stream: Batch, risks: dict[str, np.ndarray], knots: np.ndarray,
               spec: CalibrationSpec, seed: int, variant: TrustVariant) -> dict[str, dict]:
    """Per task of the calibration stream (the clean task out of fold; every other family
    scored by a model fitted without it): the strongest standard detector's AUROC
    (``peer``), trust's, the best head's, and their gaps to the peer."""
    clean = stream.group == "clean"
    oof = out_of_fold_methods(x, stream, knots, spec, risks, seed, variant)
    heads = [m for m in oof if m.startswith("head_")]
    table: dict[str, dict] = {}
    for f in ["clean", *(str(f) for f in np.unique(stream.family[~clean]))]:
        rows = stream.family == f
        if f == "clean":
            scored = {m: v[rows] for m, v in oof.items()}
        else:
            model = fit_trust_model(x[~rows], stream.select(~rows), knots, spec, variant)
            scored = _method_risks(model, {n: r[rows] for n, r in risks.items()})
        peer = {m: task_auroc(risks[m][rows], stream, rows, risks[m][clean])
                for m in BASELINES}
        best_peer = max(peer, key=lambda m: peer[m])
        ours = {m: task_auroc(v, stream, rows, oof[m][clean]) for m, v in scored.items()}
        best_head = max(heads, key=lambda m: ours[m])
        table[f] = {"peer": best_peer, "peer_auroc": round(peer[best_peer], 4),
                    "trust_gap": round(ours["trust"] - peer[best_peer], 4),
                    "best_head": best_head,
                    "head_gap": round(ours[best_head] - peer[best_peer], 4)}
    return table


def select_variant(x: np.ndarray, stream: Batch, risks: dict[str, np.ndarray],
                   knots: np.ndarray, spec: CalibrationSpec, seed: int
                   ) -> tuple[TrustVariant, dict]:
    """The variant whose best head trails the strongest standard detector least in the
    worst case over the calibration stream's tasks (:func:`lofo_table`: clean out of fold,
    every other family left out of the fit that scores it); ties: the larger worst-case
    trust gap. Only calibration data is used."""
    table: dict[str, dict] = {}
    for v in spec.variants:
        rows = lofo_table(x, stream, risks, knots, spec, seed, v)
        table[v.name] = {"tasks": rows,
                         "worst_head_gap": min(r["head_gap"] for r in rows.values()),
                         "worst_trust_gap": min(r["trust_gap"] for r in rows.values())}
    best = max(spec.variants, key=lambda v: (table[v.name]["worst_head_gap"],
                                             table[v.name]["worst_trust_gap"]))
    return best, {"criterion": "the worst case over the calibration stream's tasks of the "
                               "best head's AUROC minus the strongest standard detector's "
                               "(every family left out of the fit that scores it; clean out "
                               "of fold); ties: the worst-case trust gap",
                  "chosen": best.name, "variants": table}


class MapChoice(NamedTuple):
    """The calibration map's clean share (:func:`choose_map_share`), the ECEs of every
    candidate, and the chosen share's cross-fitted calibrated trust of the stream."""

    share: float
    table: dict[str, dict[str, float]]
    cross_fitted: np.ndarray


class ThresholdFit(NamedTuple):
    """The trust model on the whole stream; its out-of-fold scores; the raw threshold and
    the calibration map, both chosen on those scores, and how the map was chosen."""

    model: TrustModel
    threshold: float
    oof: np.ndarray
    trust_map: TrustMap
    map_choice: MapChoice


def _fit_with_threshold(x: np.ndarray, stream: Batch, risks: dict[str, np.ndarray],
                        knots: np.ndarray, spec: CalibrationSpec, seed: int,
                        variant: TrustVariant) -> ThresholdFit:
    model = fit_trust_model(x, stream, knots, spec, variant)
    oof = out_of_fold_trust(x, stream, knots, spec, risks, seed, variant)
    weights = stream_weights(stream.group, stream.family, spec.shares)
    correct_clean = (stream.group == "clean") & ~stream.wrong
    threshold = choose_threshold(oof, stream.wrong, weights, correct_clean, spec)
    choice = choose_map_share(oof, stream, weights, spec.folds, seed)
    trust_map = fit_trust_map(oof, ~stream.wrong, map_weights(stream, weights, choice.share))
    return ThresholdFit(model, threshold, oof, trust_map, choice)


# the calibration map is fitted on the stream's weights blended with clean inputs alone;
# the clean share is chosen among these by cross-fitting (choose_map_share)
MAP_CLEAN_SHARES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def map_weights(stream: Batch, weights: np.ndarray, clean_share: float) -> np.ndarray:
    """The weights the calibration map is fitted with: ``1 - clean_share`` of the mass as
    the fitting stream weighs it, ``clean_share`` spread evenly over its clean inputs. One
    monotone map cannot be exact on clean traffic and on the mixed stream at once (other
    kinds share the raw scores of some clean inputs, and are wrong more often there), so
    the blend trades the two."""
    w = weights / weights.sum()
    clean = stream.group == "clean"
    if clean_share <= 0.0 or not clean.any():
        return w
    return (1.0 - clean_share) * w + clean_share * clean / clean.sum()


def choose_map_share(oof: np.ndarray, stream: Batch, weights: np.ndarray, folds: int,
                     seed: int) -> MapChoice:
    """The clean share of :func:`map_weights` whose cross-fitted map has the smallest worse
    ECE of the two: on the stream's clean inputs and on the whole stream (weighted); ties:
    the smaller share. Returns it with the table of both ECEs per share and its
    cross-fitted calibrated trust."""
    right = ~stream.wrong
    clean = stream.group == "clean"
    table: dict[str, dict[str, float]] = {}
    best, best_key, best_cal = MAP_CLEAN_SHARES[0], (np.inf, np.inf), oof
    for share in MAP_CLEAN_SHARES:
        cal = cross_fitted_calibration(oof, stream, map_weights(stream, weights, share),
                                       folds, seed)
        e_clean = expected_calibration_error(cal[clean], right[clean]) if clean.any() else 0.0
        e_stream = expected_calibration_error(cal, right, weights)
        table[f"{share:g}"] = {"ece_clean": round(e_clean, 4), "ece_stream": round(e_stream, 4)}
        key = (round(max(e_clean, e_stream), 4), share)
        if key < best_key:
            best, best_key, best_cal = share, key, cal
    return MapChoice(best, table, best_cal)


def cross_fitted_calibration(oof: np.ndarray, stream: Batch, fit_weights: np.ndarray,
                             folds: int, seed: int) -> np.ndarray:
    """Each input's calibrated trust from a map fitted (with ``fit_weights``) on the other
    folds' out-of-fold scores (the folds of :func:`fold_of`): the fitting stream's ECE
    without scoring the map on the scores it was fitted to."""
    fold = fold_of(stream.source, folds, seed + 1)
    out = np.empty(len(oof))
    for k in range(folds):
        test = fold == k
        m = fit_trust_map(oof[~test], ~stream.wrong[~test], fit_weights[~test])
        out[test] = m(oof[test])
    return out


def stream_ece(oof: np.ndarray, stream: Batch, weights: np.ndarray, cal: np.ndarray
               ) -> dict:
    """The fitting stream's ECE (weighted as the stream is), of the raw out-of-fold trust
    ``oof`` and of its cross-fitted calibration ``cal`` (:attr:`MapChoice.cross_fitted`),
    over the whole stream and per kind."""
    right = ~stream.wrong
    out: dict = {}
    for g in ("stream", *GROUPS):
        rows = np.ones(len(oof), bool) if g == "stream" else stream.group == g
        if rows.any():
            out[g] = {"raw": round(expected_calibration_error(oof[rows], right[rows],
                                                              weights[rows]), 4),
                      "calibrated": round(expected_calibration_error(cal[rows], right[rows],
                                                                     weights[rows]), 4),
                      "n": int(rows.sum())}
    return out


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
    model, threshold, oof, trust_map, choice = _fit_with_threshold(x, stream, risks, knots,
                                                                   spec, seed, variant)
    weights = stream_weights(stream.group, stream.family, spec.shares)
    bad = stream.wrong
    accepted = oof >= threshold
    clean = stream.group == "clean"
    correct_clean = clean & ~bad
    info = {
        "stream": {g: int((stream.group == g).sum()) for g in GROUPS},
        "families": {str(f): int((stream.family == f).sum())
                     for f in np.unique(stream.family)},
        "shares": spec.shares.model_dump(),
        "variant": variant.model_dump(),
        "variant_selection": selection,
        "comparators": choose_comparators(stream, risks),
        "threshold": threshold,
        "threshold_from": "out-of-fold trust scores",
        "threshold_confidence": spec.confidence if spec.target == "accept_correct" else None,
        "folds": spec.folds,
        "calibration_coverage_clean": float(accepted[clean].mean()),
        "calibration_accept_correct": float(accepted[clean & ~bad].mean()),
        "calibration_weighted_risk_at_threshold": weighted_error_at(oof, bad, weights,
                                                                    threshold),
        "threshold_calibrated": float(trust_map(threshold)),
        "trust_map": {"fit": "weighted isotonic regression (pool adjacent violators) of "
                             "right/wrong on the out-of-fold trust of the fitting stream, "
                             "its weights blended with the clean inputs alone (the clean "
                             "share chosen by cross-fitting: the smallest worse ECE of clean "
                             "and stream), knots at the pooled blocks, blended with the "
                             "identity (strictly increasing: rankings and decisions "
                             "unchanged)",
                      "knots": len(trust_map.x), "clean_share": choice.share,
                      "clean_share_selection": choice.table},
        "stream_ece": stream_ece(oof, stream, weights, choice.cross_fitted),
        "operating_curve": operating_curve(oof, bad, weights, correct_clean, trust_map,
                                           include=(threshold,)),
    }
    return FittedMonitor(Monitor(detectors, model, threshold, trust_map), info, risks, x,
                         variant)


def refit_without(fitted: FittedMonitor, stream: Batch, family: str, spec: CalibrationSpec,
                  seed: int = 0) -> Monitor:
    """The monitor refitted (trust model and threshold, same variant; the detectors are
    fitted on the reference split and never see the stream) on the stream without
    ``family``: what scores that family in a leave-one-family-out evaluation."""
    keep = stream.family != family
    sub = stream.select(keep)
    risks = {k: v[keep] for k, v in fitted.stream_risks.items()}
    fit = _fit_with_threshold(fitted.design[keep], sub, risks,
                              fitted.monitor.trust_model.knots, spec, seed, fitted.variant)
    return Monitor(fitted.monitor.detectors, fit.model, fit.threshold, fit.trust_map)
