"""Debugging from the classifier's own geometry: what changed, and what limits a pair.

Two questions, neither of which reads the VLM (docs/method.md, "Debugging"):

1. **What changed** between a reference classifier (the bank's) and a candidate with the same
   classes and feature size? The candidate's new errors (wrong now, right with the reference)
   are re-scored with the components swapped: the candidate's encoder under the reference's
   head, and the reference's encoder under the candidate's head. The share of new errors each
   swap reproduces is that component's share (:func:`swap_shares`, :func:`changed_verdict`).
2. **What limits a confused pair (a, b)**: is the pair separable in feature space (the
   distance of the class means under a shared covariance, and a cross-validated pairwise
   linear probe on frozen features), and does the head use that separation (its own a-vs-b
   accuracy on the same inputs, the angle of ``w_a - w_b`` to the probe's discriminant, the
   offset of its boundary)? Probe well above head, or (against a reference) the reference's
   head better on the same features: the head limits the pair and retraining the last layer
   should fix it; probe about equal to head (and, against a reference, separation lost):
   the encoder limits it; otherwise abstain (:func:`pair_geometry`, :func:`limit_verdict`).

Everything here is a pure function of arrays; the heads are ``(W (C, d), b (C,))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from conceptguard.detectors import DetectorSettings
from conceptguard.gaussian import fit_class_gaussians

ENCODER, HEAD, BOTH, NONE, ABSTAIN = "encoder", "head", "both", "none", "abstain"


def head_logits(z: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Logits of a linear head on features ``z`` (float64)."""
    return np.asarray(z, np.float64) @ np.asarray(W, np.float64).T + np.asarray(b, np.float64)


@dataclass(frozen=True)
class SwapPredictions:
    """Predictions on the same inputs of the reference, the candidate and the two swaps."""

    reference: np.ndarray
    candidate: np.ndarray
    candidate_encoder: np.ndarray  # the candidate's encoder under the reference's head
    candidate_head: np.ndarray  # the reference's encoder under the candidate's head


def swap_predictions(z_ref_model: np.ndarray, z_candidate: np.ndarray,
                     ref_head: tuple[np.ndarray, np.ndarray],
                     cand_head: tuple[np.ndarray, np.ndarray]) -> SwapPredictions:
    """``z_ref_model``/``z_candidate``: features of the same inputs from each encoder."""
    return SwapPredictions(
        reference=head_logits(z_ref_model, *ref_head).argmax(1),
        candidate=head_logits(z_candidate, *cand_head).argmax(1),
        candidate_encoder=head_logits(z_candidate, *ref_head).argmax(1),
        candidate_head=head_logits(z_ref_model, *cand_head).argmax(1))


def new_errors(labels: np.ndarray, p: SwapPredictions) -> np.ndarray:
    """Mask of the candidate's new errors: right with the reference, wrong now."""
    return (p.reference == labels) & (p.candidate != labels)


def swap_shares(labels: np.ndarray, p: SwapPredictions, rows: np.ndarray) -> dict:
    """Of the new errors among ``rows`` (a mask): how many, and the share each swap
    reproduces (the input is also wrong with that component alone swapped in)."""
    return _shares(rows & new_errors(labels, p), p.candidate_encoder != labels,
                   p.candidate_head != labels)


def _shares(changed: np.ndarray, by_encoder: np.ndarray, by_head: np.ndarray) -> dict:
    """How many inputs ``changed`` marks, and the share of them each swap reproduces
    (``by_encoder``, ``by_head``: masks over all inputs)."""
    n = int(changed.sum())
    if n == 0:
        return {"new_errors": 0, "encoder_share": 0.0, "head_share": 0.0}
    return {"new_errors": n,
            "encoder_share": round(float(by_encoder[changed].mean()), 4),
            "head_share": round(float(by_head[changed].mean()), 4)}


def fixed_errors(labels: np.ndarray, p: SwapPredictions) -> np.ndarray:
    """Mask of the errors the candidate fixed: wrong with the reference, right now."""
    return (p.reference != labels) & (p.candidate == labels)


def fix_shares(labels: np.ndarray, p: SwapPredictions, rows: np.ndarray) -> dict:
    """Of the errors the candidate fixed among ``rows`` (a mask): how many, and the share
    each swap alone also fixes (the input is right with that component alone swapped in);
    the same keys as :func:`swap_shares`, so :func:`changed_verdict` reads either."""
    return _shares(rows & fixed_errors(labels, p), p.candidate_encoder == labels,
                   p.candidate_head == labels)


def changed_verdict(shares: dict, min_new_errors: int = 1, share: float = 0.5,
                    minor: float = 0.25) -> str:
    """``none`` (fewer than ``min_new_errors`` new errors); ``both`` when each swap alone
    reproduces at least ``minor`` of them (a component that did not change reproduces
    none: its swap gives the reference back, so a sizeable share in each means both
    moved), or when neither reproduces ``share`` (only the combination does); else
    ``encoder`` or ``head``, the one whose swap reproduces at least ``share``."""
    if shares["new_errors"] < min_new_errors:
        return NONE
    enc, head = shares["encoder_share"], shares["head_share"]
    if enc >= minor and head >= minor:
        return BOTH
    if enc >= share:
        return ENCODER
    if head >= share:
        return HEAD
    return BOTH


def parameter_shift(z_ref_model: np.ndarray, z_candidate: np.ndarray,
                    ref_head: tuple[np.ndarray, np.ndarray],
                    cand_head: tuple[np.ndarray, np.ndarray]) -> dict:
    """How far each component moved: the features of the same inputs (relative RMS change)
    and the head's weights and biases (relative Frobenius change)."""
    z0, z1 = np.asarray(z_ref_model, np.float64), np.asarray(z_candidate, np.float64)
    w0 = np.concatenate([np.ravel(ref_head[0]), np.ravel(ref_head[1])]).astype(np.float64)
    w1 = np.concatenate([np.ravel(cand_head[0]), np.ravel(cand_head[1])]).astype(np.float64)
    return {
        "feature_shift": round(float(np.linalg.norm(z1 - z0) / max(np.linalg.norm(z0), 1e-12)),
                               5),
        "head_shift": round(float(np.linalg.norm(w1 - w0) / max(np.linalg.norm(w0), 1e-12)),
                            5),
    }


# ------------------------------------------------------------------ pair geometry


def balanced_probe_fit(x: np.ndarray, is_a: np.ndarray, l2: float = 1e-3
                       ) -> tuple[np.ndarray, float]:
    """The class-balanced logistic discriminant ``(w, c)`` of ``a`` against ``b`` on rows
    ``x`` (``w . x + c > 0`` means ``a``), fitted on standardised columns with penalty
    ``l2 |w|^2 / 2`` by Newton's method (:func:`conceptguard.heads.fit_logistic`; the same
    optimum as a two-class multinomial fit with ``l2`` on both rows), and returned in ``x``'s
    own coordinates."""
    from conceptguard.heads import fit_logistic

    y = is_a.astype(np.float64)
    n1 = float(y.sum())
    n0 = len(y) - n1
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    weight = np.where(y == 1, len(y) / (2 * n1), len(y) / (2 * n0))
    w, c = fit_logistic((x - mean) / scale, y, l2, iters=100, sample_weight=weight)
    w = w / scale
    return w, float(c - w @ mean)


PROBE_L2 = (1e-3, 1e-2, 1e-1, 1.0)  # the tuned probe's penalties (per sample)


def _cv_hits(x: np.ndarray, is_a: np.ndarray, folds: int, seed: int, l2: float
             ) -> np.ndarray:
    """Per row: whether the probe fitted on the other folds gets it right."""
    from sklearn.model_selection import StratifiedKFold  # the offline extra

    y = is_a.astype(np.int64)
    folds = max(2, min(folds, int(y.sum()), int((1 - y).sum())))
    hits = np.zeros(len(y), bool)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        w, c = balanced_probe_fit(x[train], is_a[train], l2)
        hits[test] = (x[test] @ w + c > 0) == is_a[test]
    return hits


def _balanced_hits(hits: np.ndarray, is_a: np.ndarray) -> float:
    return 0.5 * (float(hits[is_a].mean()) + float(hits[~is_a].mean()))


def pair_probe(x: np.ndarray, is_a: np.ndarray, folds: int = 5, seed: int = 0,
               l2: float = 1e-3) -> tuple[float, np.ndarray, float]:
    """A linear probe for ``a`` vs. ``b`` on frozen rows ``x`` (class-balanced logistic
    regression, :func:`balanced_probe_fit`): the ``folds``-fold cross-validated balanced
    accuracy, and the discriminant ``(w, c)`` (``w . x + c > 0`` means ``a``) fitted on all
    rows, in ``x``'s own coordinates."""
    x = np.asarray(x, np.float64)
    hits = _cv_hits(x, is_a, folds, seed, l2)
    w, c = balanced_probe_fit(x, is_a, l2)
    return _balanced_hits(hits, is_a), w, c


def _paired_se(hits_1: np.ndarray, hits_0: np.ndarray, is_a: np.ndarray) -> float:
    """Standard error of the difference of two balanced accuracies on the same rows."""
    d = hits_1.astype(np.float64) - hits_0.astype(np.float64)
    return 0.5 * math.sqrt(sum(d[m].var(ddof=1) / m.sum() for m in (is_a, ~is_a)))


def _chosen_l2(x: np.ndarray, is_a: np.ndarray, seed: int, inner: int = 3) -> float:
    """The penalty of :data:`PROBE_L2` with the best ``inner``-fold balanced accuracy on
    these rows (ties: the larger penalty); the lightest one when a class has fewer than 2
    rows here (no inner split could hold it on both sides)."""
    if min(int(is_a.sum()), int((~is_a).sum())) < 2:
        return PROBE_L2[0]
    scores = {l2: _balanced_hits(_cv_hits(x, is_a, inner, seed + 1, l2), is_a)
              for l2 in PROBE_L2}
    return max(PROBE_L2, key=lambda l2: (scores[l2], l2))


@dataclass(frozen=True)
class Probe:
    """A tuned pairwise probe: its cross-validated per-row hits and balanced accuracy, the
    discriminant ``(w, c)`` fitted on all rows, and the penalty chosen for that fit."""

    hits: np.ndarray
    accuracy: float
    w: np.ndarray
    c: float
    l2: float


def tuned_pair_probe(x: np.ndarray, is_a: np.ndarray, folds: int = 5, seed: int = 0
                     ) -> Probe:
    """:func:`pair_probe` with its penalty chosen by nested cross-validation: in each of
    the ``folds`` outer folds the penalty is picked on the training rows alone
    (:func:`_chosen_l2`), so the held-out accuracy stays honest. A lightly penalised probe
    on a few hundred rows in many dimensions overfits and understates the separation the
    features hold, which made a head look as good as the features allow when it was not."""
    from sklearn.model_selection import StratifiedKFold  # the offline extra

    x = np.asarray(x, np.float64)
    y = is_a.astype(np.int64)
    folds = max(2, min(folds, int(y.sum()), int((1 - y).sum())))
    hits = np.zeros(len(y), bool)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        l2 = _chosen_l2(x[train], is_a[train], seed)
        w, c = balanced_probe_fit(x[train], is_a[train], l2)
        hits[test] = (x[test] @ w + c > 0) == is_a[test]
    l2 = _chosen_l2(x, is_a, seed)
    w, c = balanced_probe_fit(x, is_a, l2)
    return Probe(hits, _balanced_hits(hits, is_a), w, c, l2)


def features_whitening(z: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The whitening matrix of ``z``'s pooled within-class covariance, fitted as the bank's
    Mahalanobis detector fits it on its classifier's features. A candidate classifier's
    features need their own: the bank's whitening on another encoder's features (rescaled,
    rotated) would measure that encoder in the wrong units."""
    return fit_class_gaussians(np.asarray(z), np.asarray(labels), num_classes,
                               DetectorSettings().shrinkage).whiten


def pair_geometry(z: np.ndarray, labels: np.ndarray, a: int, b: int, W: np.ndarray,
                  bias: np.ndarray, whiten: np.ndarray | None = None, folds: int = 5,
                  seed: int = 0, reference_head: tuple[np.ndarray, np.ndarray] | None = None,
                  reference_z: np.ndarray | None = None,
                  reference_probes: dict[tuple[int, int, int, int], Probe] | None = None
                  ) -> dict:
    """The separation of classes ``a`` and ``b`` in feature space and how well the head
    ``(W, bias)`` uses it, on the rows of ``z`` labelled ``a`` or ``b``.

    - ``mahalanobis``: the distance of the two class means under the shared covariance whose
      whitening matrix is ``whiten`` (``L L^T = Sigma^-1``: the bank's for the bank's own
      classifier, :func:`features_whitening` of ``z`` for another one), less the part the
      sample means' own noise adds (``d (1/n_a + 1/n_b)`` from ``D^2``); ``gaussian_accuracy``
      the accuracy a linear rule reaches between two Gaussians that far apart, Phi(D / 2);
    - ``probe_accuracy``: the cross-validated pairwise linear probe (balanced accuracy,
      penalty tuned by nested cross-validation: :func:`tuned_pair_probe`, ``probe_l2``);
    - ``head_accuracy``: the head's own a-vs-b decision (``logit_a > logit_b``, balanced);
      ``gap_se``: the standard error of ``probe - head``, paired on the same rows;
    - ``angle_deg``: between ``w_a - w_b`` and the probe's discriminant, in the metric of
      the pair's within-class covariance (the two decision values' correlation);
    - ``bias_offset``: where the head's a-vs-b boundary sits between the two classes, in
      within-class standard deviations of its decision value (0: midway).

    With a reference classifier (a candidate diagnosed against the bank's), on the same rows:
    ``reference_head_accuracy``, the reference's head on these (the candidate's) features,
    and ``reference_head_gap`` (its lead over the candidate's head, with ``_se``): a head
    known to do better on these very features; ``reference_probe_accuracy``, the probe on the
    reference's own features (``reference_z``), and ``separation_loss`` (its lead over the
    candidate's probe, with ``_se``): how much separation the candidate's encoder lost.
    ``reference_probes``: a dict the caller keeps for one ``reference_z`` (and ``labels``),
    so that diagnosing many candidates fits each pair's reference probe once."""
    rows = (labels == a) | (labels == b)
    x = np.asarray(z, np.float64)[rows]
    is_a = labels[rows] == a
    if is_a.sum() < 2 or (~is_a).sum() < 2:
        raise ValueError(f"pair geometry needs at least 2 inputs of each class, got "
                         f"{int(is_a.sum())} and {int((~is_a).sum())}")
    out: dict = {"n": int(rows.sum())}
    mu_a, mu_b = x[is_a].mean(0), x[~is_a].mean(0)
    if whiten is not None:
        d2 = float(np.sum(((mu_a - mu_b) @ np.asarray(whiten, np.float64)) ** 2))
        # the sample means' noise adds about d (1/n_a + 1/n_b) to D^2: taken off
        d2 -= x.shape[1] * (1 / is_a.sum() + 1 / (~is_a).sum())
        d = math.sqrt(max(d2, 0.0))
        out["mahalanobis"] = round(d, 4)
        out["gaussian_accuracy"] = round(0.5 * (1 + math.erf(d / 2 / math.sqrt(2))), 4)
    probe = tuned_pair_probe(x, is_a, folds, seed)
    w_head = np.asarray(W, np.float64)[a] - np.asarray(W, np.float64)[b]
    c_head = float(bias[a]) - float(bias[b])
    dec = x @ w_head + c_head
    head_hits = (dec > 0) == is_a
    head_acc = _balanced_hits(head_hits, is_a)
    # the angle in the within-class covariance metric: the correlation of the two decision
    # values over the pair's inputs, each class centred (0 degrees: the same decision)
    centred = np.where(is_a[:, None], x - mu_a, x - mu_b)
    u, v = centred @ w_head, centred @ probe.w
    cos = float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12))
    spread = math.sqrt(0.5 * (dec[is_a].var() + dec[~is_a].var()))
    midpoint = 0.5 * (dec[is_a].mean() + dec[~is_a].mean())
    out.update({
        "probe_accuracy": round(probe.accuracy, 4),
        "probe_l2": probe.l2,
        "head_accuracy": round(head_acc, 4),
        "gap": round(probe.accuracy - head_acc, 4),
        "gap_se": round(_paired_se(probe.hits, head_hits, is_a), 5),
        "angle_deg": round(math.degrees(math.acos(max(-1.0, min(1.0, cos)))), 2),
        "bias_offset": round(midpoint / spread, 3) if spread > 0 else None,
    })
    if reference_head is not None:
        W0, b0 = (np.asarray(t, np.float64) for t in reference_head)
        ref_hits = (x @ (W0[a] - W0[b]) + float(b0[a] - b0[b]) > 0) == is_a
        ref_acc = _balanced_hits(ref_hits, is_a)
        out.update({"reference_head_accuracy": round(ref_acc, 4),
                    "reference_head_gap": round(ref_acc - head_acc, 4),
                    "reference_head_gap_se": round(_paired_se(ref_hits, head_hits, is_a), 5)})
    if reference_z is not None:
        key = (a, b, folds, seed)
        ref_probe = None if reference_probes is None else reference_probes.get(key)
        if ref_probe is None:
            ref_probe = (probe if reference_z is z else  # the same features: the same probe
                         tuned_pair_probe(np.asarray(reference_z, np.float64)[rows], is_a,
                                          folds, seed))
            if reference_probes is not None:
                reference_probes[key] = ref_probe
        out.update({"reference_probe_accuracy": round(ref_probe.accuracy, 4),
                    "separation_loss": round(ref_probe.accuracy - probe.accuracy, 4),
                    "separation_loss_se": round(_paired_se(ref_probe.hits, probe.hits, is_a),
                                                5)})
    return out


@dataclass(frozen=True)
class LimitRule:
    """``head`` when the probe beats the head by at least ``head_gap`` and by more than ``z``
    standard errors, or when the reference's head beats it on the same features by at least
    ``reference_gap`` and ``z`` standard errors. ``encoder`` when the probe is at most
    ``encoder_gap`` above the head and its upper bound (``z`` standard errors up) stays below
    ``head_gap``, and, against a reference, the candidate's encoder lost separation (the
    probe on the reference's features beats the probe on the candidate's by at least
    ``reference_gap`` and ``z`` standard errors). Otherwise ``abstain``. Where the probe
    beats the head and the encoder also lost separation, a retrained head wins back at
    most the probe's lead, ``gap / (gap + separation_loss)`` of what the pair lost: above
    ``recoverable[1]`` ``head``, below ``recoverable[0]`` ``encoder``, between ``abstain``."""

    head_gap: float = 0.03
    encoder_gap: float = 0.01
    reference_gap: float = 0.005
    z: float = 2.0
    recoverable: tuple[float, float] = (0.4, 0.6)


def limit_verdict(geometry: dict, rule: LimitRule = LimitRule()) -> str:
    """:class:`LimitRule` on :func:`pair_geometry`'s evidence."""
    g = geometry
    gap, se = g["probe_accuracy"] - g["head_accuracy"], g["gap_se"]
    loss = g.get("separation_loss")
    lost = (loss is not None and loss >= rule.reference_gap
            and loss > rule.z * g["separation_loss_se"])
    if gap >= rule.head_gap and gap > rule.z * se:
        if not lost:
            return HEAD
        # a new head can win back the probe's lead over this head, not the separation the
        # encoder lost: its share of what the pair lost decides (the repair's test: half)
        share = gap / (gap + loss)
        low, high = rule.recoverable
        return HEAD if share > high else ENCODER if share < low else ABSTAIN
    ref_gap = g.get("reference_head_gap")
    if (ref_gap is not None and ref_gap >= rule.reference_gap
            and ref_gap > rule.z * g["reference_head_gap_se"]):
        return HEAD  # a head known to do better on these very features
    head_uses_it = gap <= rule.encoder_gap and gap + rule.z * se <= rule.head_gap
    if loss is None:
        return ENCODER if head_uses_it else ABSTAIN
    return ENCODER if head_uses_it and lost else ABSTAIN


# ------------------------------------------------------------------ pairs and outcomes


def confused_pairs(labels: np.ndarray, predictions: np.ndarray, min_errors: int = 1,
                   top: int | None = None) -> list[tuple[int, int, int]]:
    """``(true, predicted, count)`` of the errors, most frequent first (ties by index)."""
    wrong = predictions != labels
    keys, counts = np.unique(np.stack([labels[wrong], predictions[wrong]], 1), axis=0,
                             return_counts=True) if wrong.any() else (np.zeros((0, 2)), [])
    pairs = [(int(k[0]), int(k[1]), int(c)) for k, c in zip(keys, counts, strict=True)
             if c >= min_errors]
    pairs.sort(key=lambda t: (-t[2], t[0], t[1]))
    return pairs[:top] if top is not None else pairs


def pair_accuracy(labels: np.ndarray, predictions: np.ndarray, a: int, b: int) -> float:
    """Accuracy (full argmax) on the inputs labelled ``a`` or ``b``."""
    rows = (labels == a) | (labels == b)
    return float((predictions[rows] == labels[rows]).mean()) if rows.any() else float("nan")


def pair_errors(labels: np.ndarray, predictions: np.ndarray, a: int, b: int) -> int:
    """Errors between the two classes, both directions (``a`` called ``b`` and back)."""
    return int((((labels == a) & (predictions == b)) | ((labels == b) & (predictions == a)))
               .sum())


def repair_outcome(before: int, after: int, floor: int | None, fixed_share: float = 0.5,
                   min_lost: int = 5) -> dict:
    """The measured effect of a repair on one pair, in errors between its two classes
    (:func:`pair_errors`: what the a-vs-b verdict is about; errors into a third class are
    another pair's). ``before``/``after``: the candidate's and the repaired model's;
    ``floor``: the reference's, for a fault (the lost errors are those above it), None
    without one (every error is lost). ``recovered``: the share of the lost errors the
    repair removed (above 1: it beat the reference); ``fixed``: at least ``fixed_share``
    of them. Fewer than ``min_lost`` lost errors is too few to measure: both None."""
    target = 0 if floor is None else min(floor, before)
    lost = before - target
    recovered = (before - after) / lost if lost >= min_lost else None
    return {"errors_before": int(before), "errors_after": int(after),
            "errors_reference": None if floor is None else int(floor),
            "recovered": None if recovered is None else round(recovered, 4),
            "fixed": None if recovered is None else bool(recovered >= fixed_share)}


def agrees(limit: str, outcome: dict) -> bool | None:
    """A decided verdict agrees with the repair when ``head`` meets ``fixed`` and
    ``encoder`` meets not fixed; None for ``abstain`` or an unmeasurable outcome."""
    if limit not in (HEAD, ENCODER) or outcome.get("fixed") is None:
        return None
    return outcome["fixed"] == (limit == HEAD)
