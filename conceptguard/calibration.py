"""Fit the monitor: class statistics on the reference split, the two defect heads and the
combiner on the calibration split, and the reject threshold for a stated target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from conceptguard.gaussian import fit_class_gaussians
from conceptguard.heads import fit_combiner, fit_head, mixture_combiner
from conceptguard.heatmaps import Heatmaps
from conceptguard.scoring import Monitor, score
from conceptguard.signals import SignalStats, compute_signals, head_features


class CalibrationSpec(BaseModel):
    """``accept_correct``: accept at least ``value`` of the correct clean predictions.
    ``max_risk``: the largest coverage whose error rate among accepted inputs of the mixed
    calibration stream is at most ``value``."""

    model_config = ConfigDict(extra="forbid")

    target: Literal["accept_correct", "max_risk"] = "accept_correct"
    value: float = Field(0.95, gt=0.0, lt=1.0)
    mixed_adversarial_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    l2: float = 1e-2
    shrinkage: float = 1e-3


@dataclass(frozen=True)
class Batch:
    """Classifier outputs for a set of inputs, with labels (adversarial: original labels)."""

    logits: np.ndarray
    features: np.ndarray
    concepts: np.ndarray
    labels: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(1)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, mask: np.ndarray) -> Batch:
        return Batch(self.logits[mask], self.features[mask], self.concepts[mask],
                     self.labels[mask])

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        return Batch(*(np.concatenate([getattr(b, f) for b in batches])
                       for f in ("logits", "features", "concepts", "labels")))


def mixed_weights(n_clean: int, n_adv: int, fraction: float) -> np.ndarray:
    """Sample weights that make adversarial inputs ``fraction`` of the weighted stream."""
    if n_adv == 0 or fraction == 0:
        return np.concatenate([np.ones(n_clean), np.zeros(n_adv)])
    w_adv = fraction * n_clean / ((1 - fraction) * n_adv)
    return np.concatenate([np.ones(n_clean), np.full(n_adv, w_adv)])


def weighted_aurc(risk: np.ndarray, error: np.ndarray, weights: np.ndarray) -> float:
    """Area under the risk-coverage curve of a weighted stream (accept the least risky
    first; coverage and risk counted in weight)."""
    order = np.argsort(risk, kind="mergesort")
    cum_err = np.cumsum((error * weights)[order])
    cum_w = np.cumsum(weights[order])
    return float(np.sum(weights[order] * cum_err / cum_w) / cum_w[-1])


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


def fit_monitor(reference: Batch, heatmaps: Heatmaps, calibration: Batch,
                calibration_adv: Batch, spec: CalibrationSpec) -> tuple[Monitor, dict]:
    """``calibration_adv``: successful adversarial versions of correct calibration inputs."""
    c = heatmaps.ok.shape[0]
    stats = SignalStats(
        h_ok=heatmaps.ok, h_bad=heatmaps.bad, h_adv=heatmaps.adv,
        features=fit_class_gaussians(reference.features, reference.labels, c, spec.shrinkage),
        concepts=fit_class_gaussians(reference.concepts, reference.labels, c, spec.shrinkage),
    )
    x_clean = head_features(compute_signals(calibration.logits, calibration.features,
                                            calibration.concepts, stats))
    x_adv = head_features(compute_signals(calibration_adv.logits, calibration_adv.features,
                                          calibration_adv.concepts, stats))
    wrong = calibration.predictions != calibration.labels
    head_mis = fit_head(x_clean, wrong, spec.l2)
    x_pair = np.concatenate([x_clean[~wrong], x_adv])
    y_pair = np.concatenate([np.zeros((~wrong).sum()), np.ones(len(x_adv))])
    head_adv = fit_head(x_pair, y_pair.astype(bool), spec.l2)

    x_mixed = np.concatenate([x_clean, x_adv])
    bad = np.concatenate([wrong, np.ones(len(x_adv), dtype=bool)])
    weights = mixed_weights(len(x_clean), len(x_adv), spec.mixed_adversarial_fraction)
    l_mis, l_adv = head_mis.logit(x_mixed), head_adv.logit(x_mixed)
    candidates = {
        "logistic": fit_combiner(l_mis, l_adv, bad, weights),
        "mixture": mixture_combiner(int((~wrong).sum()), len(x_adv),
                                    spec.mixed_adversarial_fraction),
    }
    # pick the combiner with the lower weighted AURC on the calibration stream
    aurcs = {k: weighted_aurc(1.0 - c.trust(l_mis, l_adv), bad, weights)
             for k, c in candidates.items()}
    combiner_kind = min(aurcs, key=aurcs.get)
    combiner = candidates[combiner_kind]
    provisional = Monitor(stats, head_mis, head_adv, combiner, threshold=0.0)
    mixed = Batch.concat([calibration, calibration_adv])
    trust = score(provisional, mixed.logits, mixed.features, mixed.concepts).trust
    correct_clean = np.concatenate([~wrong, np.zeros(len(x_adv), dtype=bool)])
    threshold = choose_threshold(trust, bad, weights, correct_clean, spec)
    monitor = Monitor(stats, head_mis, head_adv, combiner, threshold)
    accepted = trust >= threshold
    info = {
        "calibration_clean": len(calibration),
        "calibration_wrong": int(wrong.sum()),
        "calibration_adversarial": len(calibration_adv),
        "threshold": threshold,
        "combiner": combiner_kind,
        "combiner_calibration_aurc": {k: round(v, 5) for k, v in aurcs.items()},
        "calibration_coverage_clean": float(accepted[: len(calibration)].mean()),
        "calibration_accept_correct": float(accepted[correct_clean].mean()),
    }
    return monitor, info
