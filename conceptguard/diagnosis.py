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
   offset of its boundary)? Probe well above head: the head limits the pair and retraining the
   last layer should fix it; probe about equal to head: the encoder limits it; in between:
   abstain (:func:`pair_geometry`, :func:`limit_verdict`).

Everything here is a pure function of arrays; the heads are ``(W (C, d), b (C,))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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
    new = rows & new_errors(labels, p)
    n = int(new.sum())
    if n == 0:
        return {"new_errors": 0, "encoder_share": 0.0, "head_share": 0.0}
    y = labels[new]
    return {"new_errors": n,
            "encoder_share": round(float((p.candidate_encoder[new] != y).mean()), 4),
            "head_share": round(float((p.candidate_head[new] != y).mean()), 4)}


def changed_verdict(shares: dict, min_new_errors: int = 1, share: float = 0.5) -> str:
    """``none`` (fewer than ``min_new_errors`` new errors), ``encoder`` or ``head`` (that
    swap alone reproduces at least ``share`` of them and the other does not), else ``both``
    (each reproduces them, or only the combination does)."""
    if shares["new_errors"] < min_new_errors:
        return NONE
    enc, head = shares["encoder_share"] >= share, shares["head_share"] >= share
    if enc and not head:
        return ENCODER
    if head and not enc:
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


def _balanced_accuracy(pred_is_a: np.ndarray, is_a: np.ndarray) -> float:
    return 0.5 * (float(pred_is_a[is_a].mean()) + float((~pred_is_a[~is_a]).mean()))


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


def pair_probe(x: np.ndarray, is_a: np.ndarray, folds: int = 5, seed: int = 0,
               l2: float = 1e-3) -> tuple[float, np.ndarray, float]:
    """A linear probe for ``a`` vs. ``b`` on frozen rows ``x`` (class-balanced logistic
    regression, :func:`balanced_probe_fit`): the ``folds``-fold cross-validated balanced
    accuracy, and the discriminant ``(w, c)`` (``w . x + c > 0`` means ``a``) fitted on all
    rows, in ``x``'s own coordinates."""
    from sklearn.model_selection import StratifiedKFold  # the offline extra

    x = np.asarray(x, np.float64)
    y = is_a.astype(np.int64)
    folds = max(2, min(folds, int(y.sum()), int((1 - y).sum())))
    hits = np.zeros(len(y), bool)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        w, c = balanced_probe_fit(x[train], is_a[train], l2)
        hits[test] = (x[test] @ w + c > 0) == is_a[test]
    acc = 0.5 * (float(hits[y == 1].mean()) + float(hits[y == 0].mean()))
    w, c = balanced_probe_fit(x, is_a, l2)
    return acc, w, c


def pair_geometry(z: np.ndarray, labels: np.ndarray, a: int, b: int, W: np.ndarray,
                  bias: np.ndarray, whiten: np.ndarray | None = None, folds: int = 5,
                  seed: int = 0) -> dict:
    """The separation of classes ``a`` and ``b`` in feature space and how well the head
    ``(W, bias)`` uses it, on the rows of ``z`` labelled ``a`` or ``b``.

    - ``mahalanobis``: the distance of the two class means under the shared covariance whose
      whitening matrix is ``whiten`` (``L L^T = Sigma^-1``; the bank's), less the part the
      sample means' own noise adds (``d (1/n_a + 1/n_b)`` from ``D^2``); ``gaussian_accuracy``
      the accuracy a linear rule reaches between two Gaussians that far apart, Phi(D / 2);
    - ``probe_accuracy``: the cross-validated pairwise linear probe (balanced accuracy);
    - ``head_accuracy``: the head's own a-vs-b decision (``logit_a > logit_b``, balanced);
    - ``angle_deg``: between ``w_a - w_b`` and the probe's discriminant, in the metric of
      the pair's within-class covariance (the two decision values' correlation);
    - ``bias_offset``: where the head's a-vs-b boundary sits between the two classes, in
      within-class standard deviations of its decision value (0: midway)."""
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
    probe_acc, w_probe, _ = pair_probe(x, is_a, folds, seed)
    w_head = np.asarray(W, np.float64)[a] - np.asarray(W, np.float64)[b]
    c_head = float(bias[a]) - float(bias[b])
    dec = x @ w_head + c_head
    head_acc = _balanced_accuracy(dec > 0, is_a)
    # the angle in the within-class covariance metric: the correlation of the two decision
    # values over the pair's inputs, each class centred (0 degrees: the same decision)
    centred = np.where(is_a[:, None], x - mu_a, x - mu_b)
    u, v = centred @ w_head, centred @ w_probe
    cos = float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12))
    spread = math.sqrt(0.5 * (dec[is_a].var() + dec[~is_a].var()))
    midpoint = 0.5 * (dec[is_a].mean() + dec[~is_a].mean())
    out.update({
        "probe_accuracy": round(probe_acc, 4),
        "head_accuracy": round(head_acc, 4),
        "gap": round(probe_acc - head_acc, 4),
        "angle_deg": round(math.degrees(math.acos(max(-1.0, min(1.0, cos)))), 2),
        "bias_offset": round(midpoint / spread, 3) if spread > 0 else None,
    })
    return out


@dataclass(frozen=True)
class LimitRule:
    """``head`` when the probe beats the head by at least ``head_gap`` (and by more than
    ``z`` standard errors); ``encoder`` when the gap is at most ``encoder_gap``; otherwise
    ``abstain``."""

    head_gap: float = 0.03
    encoder_gap: float = 0.01
    z: float = 2.0


def limit_verdict(geometry: dict, rule: LimitRule = LimitRule()) -> str:
    p, h, n = geometry["probe_accuracy"], geometry["head_accuracy"], max(geometry["n"], 1)
    gap = p - h
    se = math.sqrt(max(p * (1 - p), 0.25 / n) / n + max(h * (1 - h), 0.25 / n) / n)
    if gap >= rule.head_gap and gap > rule.z * se:
        return HEAD
    if gap <= rule.encoder_gap:
        return ENCODER
    return ABSTAIN


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


def repair_outcome(before: float, after: float, floor: float | None, fixed_share: float = 0.5
                   ) -> dict:
    """The measured effect of a repair on one pair's accuracy. ``floor``: the accuracy a good
    model reaches (the reference's, for a fault); without one, the lost accuracy is all the
    errors. ``recovered``: the share of the lost accuracy the repair won back; ``fixed``:
    at least ``fixed_share`` of it."""
    target = 1.0 if floor is None else max(floor, before)
    lost = target - before
    recovered = (after - before) / lost if lost > 1e-12 else None
    return {"before": round(before, 4), "after": round(after, 4),
            "reference": None if floor is None else round(floor, 4),
            "recovered": None if recovered is None else round(recovered, 4),
            "fixed": None if recovered is None else bool(recovered >= fixed_share)}


def agrees(limit: str, outcome: dict) -> bool | None:
    """A decided verdict agrees with the repair when ``head`` meets ``fixed`` and
    ``encoder`` meets not fixed; None for ``abstain`` or an unmeasurable outcome."""
    if limit not in (HEAD, ENCODER) or outcome.get("fixed") is None:
        return None
    return outcome["fixed"] == (limit == HEAD)
