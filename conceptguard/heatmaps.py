"""Semantic heatmaps: per-class means of standardised concept scores (docs/method.md, section 4).

All functions are pure. A heatmap is a ``(C, K)`` float32 matrix; rows of classes without
inputs are NaN in the raw means and are filled by the pooled fallback where a row is used
for scoring (``H_bad``, ``H_adv``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def class_means(scores: np.ndarray, groups: np.ndarray, num_classes: int,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean row of ``scores`` per group value (only rows where ``mask``); NaN where empty."""
    if mask is not None:
        scores, groups = scores[mask], groups[mask]
    k = scores.shape[1]
    sums = np.zeros((num_classes, k), dtype=np.float64)
    np.add.at(sums, groups, scores)
    counts = np.bincount(groups, minlength=num_classes).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means[counts == 0] = np.nan
    return means.astype(np.float32), counts


def pooled_fallback(own: np.ndarray, own_counts: np.ndarray, anchor: np.ndarray,
                    scores: np.ndarray, groups: np.ndarray, min_count: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Rows with fewer than ``min_count`` inputs become ``anchor[c]`` plus the pooled mean
    offset ``mean_i(scores_i - anchor[groups_i])`` over all classes' inputs.

    Returns the filled heatmap and the boolean vector of classes that fell back."""
    fallback = own_counts < min_count
    filled = own.copy()
    if fallback.any():
        if len(scores):
            offset = (scores - anchor[groups]).mean(0)
        else:
            offset = np.zeros(own.shape[1], dtype=np.float32)
        offset = np.nan_to_num(offset)
        filled[fallback] = anchor[fallback] + offset
    return np.nan_to_num(filled).astype(np.float32), fallback


@dataclass
class Heatmaps:
    """Every heatmap of docs/method.md for one view (model or VLM), plus counts and fallbacks."""

    gt: np.ndarray
    out: np.ndarray
    ok: np.ndarray
    bad: np.ndarray
    adv: np.ndarray
    counts: dict[str, np.ndarray]
    fallback: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def diff(self) -> np.ndarray:
        return self.ok - self.bad

    @property
    def diff_adv(self) -> np.ndarray:
        return self.ok - self.adv

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}.{name}": getattr(self, name).astype(np.float32)
               for name in ("gt", "out", "ok", "bad", "adv", "diff", "diff_adv")}
        for name, c in self.counts.items():
            out[f"{prefix}.count_{name}"] = c.astype(np.int64)
        return out


def build_heatmaps(
    scores: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    num_classes: int,
    *,
    adv_scores: np.ndarray | None = None,
    adv_predictions: np.ndarray | None = None,
    min_count: int = 5,
) -> Heatmaps:
    """Ground-truth, output-label, correct, incorrect and adversarial heatmaps.

    ``adv_scores``/``adv_predictions`` are those of adversarial versions of correctly
    classified inputs; only the ones the classifier now gets wrong should be passed."""
    correct = labels == predictions
    gt, n_gt = class_means(scores, labels, num_classes)
    out, n_out = class_means(scores, predictions, num_classes)
    ok, n_ok = class_means(scores, predictions, num_classes, correct)
    ok_filled = np.where(np.isnan(ok), out, ok)
    ok_filled = np.nan_to_num(ok_filled)
    bad_raw, n_bad = class_means(scores, predictions, num_classes, ~correct)
    bad, fb_bad = pooled_fallback(bad_raw, n_bad, ok_filled, scores[~correct],
                                  predictions[~correct], min_count)
    if adv_scores is None or adv_predictions is None or len(adv_scores) == 0:
        adv_scores = np.zeros((0, scores.shape[1]), dtype=np.float32)
        adv_predictions = np.zeros(0, dtype=np.int64)
    adv_raw, n_adv = class_means(adv_scores, adv_predictions, num_classes)
    adv, fb_adv = pooled_fallback(adv_raw, n_adv, ok_filled, adv_scores, adv_predictions,
                                  min_count)
    return Heatmaps(
        gt=np.nan_to_num(gt), out=np.nan_to_num(out), ok=ok_filled.astype(np.float32),
        bad=bad, adv=adv,
        counts={"gt": n_gt, "out": n_out, "ok": n_ok, "bad": n_bad, "adv": n_adv},
        fallback={"bad": fb_bad, "adv": fb_adv},
    )


def binarise(diff: np.ndarray, delta: float) -> np.ndarray:
    """``sign(D)`` where ``|D| > delta``, else 0 (int8)."""
    return (np.sign(diff) * (np.abs(diff) > delta)).astype(np.int8)


def top_concepts(row: np.ndarray, names: list[str], k: int = 3) -> list[tuple[str, float]]:
    """The ``k`` entries of ``row`` with the largest magnitude, with their signed values."""
    order = np.argsort(-np.abs(row))[:k]
    return [(names[i], float(row[i])) for i in order]
