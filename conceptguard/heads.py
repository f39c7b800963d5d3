"""Logistic heads: L2-regularised logistic regressions on standardised features (the trust
model's heads, :mod:`conceptguard.trust`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _logistic_objective(xa: np.ndarray, y: np.ndarray, sw: np.ndarray, penalty: np.ndarray,
                        theta: np.ndarray) -> float:
    """Mean weighted log-loss plus ``penalty . theta^2 / 2`` (softplus written stably)."""
    z = xa @ theta
    loss = np.logaddexp(0.0, z) - y * z
    return float((sw * loss).mean() + 0.5 * (penalty * theta * theta).sum())


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50,
                 sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Newton's method for ``P(y=1|x) = sigmoid(x w + b)`` with penalty ``l2 |w|^2 / 2``
    (per sample, so it does not depend on the data size). Returns ``(w, b)``.

    A full Newton step is taken whenever it lowers the objective (the usual case, and then
    nothing else is computed differently); otherwise it is halved until it does, so nearly
    separable rows with a small ``l2`` still converge instead of overshooting."""
    n, f = x.shape
    if n == 0 or y.min() == y.max():
        raise ValueError("logistic head: need both positive and negative examples")
    sw = np.ones(n) if sample_weight is None else sample_weight.astype(np.float64)
    sw = sw / sw.mean()
    xa = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(f + 1)
    penalty = np.full(f + 1, l2)
    penalty[-1] = 0.0
    objective = _logistic_objective(xa, y, sw, penalty, theta)
    for _ in range(iters):
        p = sigmoid(xa @ theta)
        grad = xa.T @ (sw * (p - y)) / n + penalty * theta
        hess = (xa * (sw * p * (1 - p))[:, None]).T @ xa / n + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        for _ in range(30):
            trial = _logistic_objective(xa, y, sw, penalty, theta - step)
            if trial <= objective:
                break
            step = 0.5 * step
        theta -= step
        objective = min(objective, trial)
        if np.abs(step).max() < 1e-8:
            break
    return theta[:-1], float(theta[-1])


@dataclass(frozen=True)
class LogisticHead:
    """``P(defect) = sigmoid(((x - mean) / scale) w + b)``."""

    mean: np.ndarray
    scale: np.ndarray
    w: np.ndarray
    b: float

    def logit(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.w + self.b

    def probability(self, x: np.ndarray) -> np.ndarray:
        return sigmoid(self.logit(x))


def fit_head(x: np.ndarray, positive: np.ndarray, l2: float = 1e-2,
             sample_weight: np.ndarray | None = None) -> LogisticHead:
    """Standardise the design matrix, then fit the logistic regression."""
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-9] = 1.0
    w, b = fit_logistic((x - mean) / scale, positive.astype(np.float64), l2,
                        sample_weight=sample_weight)
    return LogisticHead(mean, scale, w, b)


NEVER_P = 1e-6


def never_head(x: np.ndarray) -> LogisticHead:
    """A head without positives to fit on (no attacks in a build whose classifier has no
    gradients): ``P(defect) = NEVER_P`` for every input."""
    f = x.shape[1]
    return LogisticHead(np.zeros(f), np.ones(f), np.zeros(f),
                        float(np.log(NEVER_P / (1.0 - NEVER_P))))
