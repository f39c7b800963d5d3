"""Detection and selective-prediction metrics. Convention: a *risk score*, higher = more
likely defective; ``positive`` marks the defective inputs (wrong or adversarial)."""

from __future__ import annotations

from collections.abc import Iterator

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


def bootstrap_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n)`` multiplicities of a nonparametric bootstrap over ``n`` inputs."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


BOOTSTRAP_BLOCK_ELEMENTS = 1 << 20  # counts per block: 8 MiB of float64, whatever n is


def bootstrap_blocks(n: int, resamples: int, seed: int,
                     max_elements: int = BOOTSTRAP_BLOCK_ELEMENTS) -> Iterator[np.ndarray]:
    """The rows of :func:`bootstrap_counts` (the same values), a block of at most
    ``max(1, max_elements // n)`` rows at a time, so memory does not grow with ``n``."""
    rng = np.random.default_rng(seed)
    rows = max(1, max_elements // max(n, 1))
    p = np.full(n, 1.0 / n)
    for start in range(0, resamples, rows):
        size = min(rows, resamples - start)
        yield rng.multinomial(n, p, size=size).astype(np.float64)


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, counts: np.ndarray
                   ) -> np.ndarray:
    """AUROC under each row of ``counts`` (multiplicities per input, e.g. bootstrap
    resamples): P(positive scores above negative), ties half. Returns ``(rows,)``."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    counts = np.atleast_2d(counts)
    order = np.argsort(scores, kind="mergesort")
    s, pos, c = scores[order], positive[order], counts[:, order]
    cneg = c * ~pos
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s)) + 1])
    group = np.cumsum(np.r_[0, (np.diff(s) != 0).astype(np.int64)])
    below = (np.cumsum(cneg, axis=1) - cneg)[:, starts]  # negatives strictly lower
    tied = np.add.reduceat(cneg, starts, axis=1)
    credit = below[:, group] + 0.5 * tied[:, group]
    cpos = c * pos
    n_pos, n_neg = cpos.sum(1), cneg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cpos * credit).sum(1) / (n_pos * n_neg)


def weighted_aurc(scores: np.ndarray, error: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Area under the risk-coverage curve under each row of ``counts`` (accept the least
    risky first). Returns ``(rows,)``."""
    counts = np.atleast_2d(counts)
    order = np.argsort(np.asarray(scores, np.float64), kind="mergesort")
    c = counts[:, order]
    cum_err = np.cumsum(c * np.asarray(error, np.float64)[order], axis=1)
    cum_w = np.cumsum(c, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        risk = np.where(cum_w > 0, cum_err / np.maximum(cum_w, 1e-12), 0.0)
    return (c * risk).sum(1) / c.sum(1)


def interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """The percentile interval of bootstrap ``samples`` (NaNs dropped)."""
    s = samples[np.isfinite(samples)]
    if len(s) == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(s, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def cluster_bootstrap_blocks(clusters: np.ndarray, resamples: int, seed: int,
                             max_elements: int = BOOTSTRAP_BLOCK_ELEMENTS
                             ) -> Iterator[np.ndarray]:
    """A clustered bootstrap: each resample draws the distinct ``clusters`` (e.g. source
    image ids) with replacement, and every input gets its cluster's multiplicity, so the
    inputs of one cluster (an image, its corrupted and attacked variants) are resampled
    together. Yields ``(rows, n)`` count blocks like :func:`bootstrap_blocks` (the same
    distribution when every cluster holds one input)."""
    ids, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    rng = np.random.default_rng(seed)
    n, m = len(inverse), len(ids)
    rows = max(1, max_elements // max(n, 1))
    p = np.full(m, 1.0 / m)
    for start in range(0, resamples, rows):
        size = min(rows, resamples - start)
        yield rng.multinomial(m, p, size=size).astype(np.float64)[:, inverse]


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (NaN: not tested, left out):
    the k-th smallest of m is multiplied by ``m - k + 1``, made monotone, capped at 1."""
    keys = [k for k, p in pvalues.items() if np.isfinite(p)]
    order = sorted(keys, key=lambda k: pvalues[k])
    m = len(order)
    out: dict[str, float] = {k: float("nan") for k in pvalues}
    running = 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        out[k] = running
    return out


def bootstrap_pvalue(samples: np.ndarray, bound: float = 0.0) -> float:
    """One-sided bootstrap p-value that the statistic is at or below ``bound`` (its share of
    resamples at or below it, with the +1 correction): small when the samples lie above."""
    s = samples[np.isfinite(samples)]
    if len(s) == 0:
        return float("nan")
    return float((1 + (s <= bound).sum()) / (1 + len(s)))
