"""Detection and selective-prediction metrics. Convention: a *risk score*, higher = more
likely defective; ``positive`` marks the defective inputs (wrong or adversarial)."""

from __future__ import annotations

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fpr_at_tpr(scores: np.ndarray, positive: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of negatives flagged at the smallest threshold that flags ``tpr`` of positives."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if positive.sum() == 0 or (~positive).sum() == 0:
        return float("nan")
    pos = np.sort(scores[positive])[::-1]
    k = int(np.ceil(tpr * len(pos)))
    threshold = pos[k - 1]
    return float((scores[~positive] >= threshold).mean())


def risk_coverage(scores: np.ndarray, error: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accept the least risky first: coverage k/n and the error rate among the k accepted."""
    scores = np.asarray(scores, dtype=np.float64)
    error = np.asarray(error, dtype=np.float64)
    order = np.argsort(scores, kind="mergesort")
    cum = np.cumsum(error[order])
    k = np.arange(1, len(scores) + 1)
    return k / len(scores), cum / k


def aurc(scores: np.ndarray, error: np.ndarray) -> float:
    """Area under the risk-coverage curve (mean selective risk over all coverages)."""
    if len(scores) == 0:
        return float("nan")
    _, risk = risk_coverage(scores, error)
    return float(risk.mean())


def risk_at_coverage(scores: np.ndarray, error: np.ndarray, coverage: float) -> float:
    """Error rate among the ``coverage`` fraction of inputs with the lowest risk scores."""
    if len(scores) == 0:
        return float("nan")
    _, risk = risk_coverage(scores, error)
    k = max(1, int(np.ceil(coverage * len(scores))))
    return float(risk[k - 1])


def detection_summary(scores: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """AUROC, FPR at 95% TPR and AURC (with ``positive`` as the error indicator)."""
    return {
        "auroc": auroc(scores, positive),
        "fpr_at_95tpr": fpr_at_tpr(scores, positive, 0.95),
        "aurc": aurc(scores, positive),
    }
