"""Defect heads: L2-regularised logistic regressions on standardised signal features,
each fitted on its own task, and the logistic combiner that turns them into ``trust``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50,
                 sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Newton's method for ``P(y=1|x) = sigmoid(x w + b)`` with penalty ``l2 |w|^2 / 2``
    (per sample, so it does not depend on the data size). Returns ``(w, b)``."""
    n, f = x.shape
    if n == 0 or y.min() == y.max():
        raise ValueError("logistic head: need both positive and negative examples")
    sw = np.ones(n) if sample_weight is None else sample_weight.astype(np.float64)
    sw = sw / sw.mean()
    xa = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(f + 1)
    penalty = np.full(f + 1, l2)
    penalty[-1] = 0.0
    for _ in range(iters):
        p = sigmoid(xa @ theta)
        grad = xa.T @ (sw * (p - y)) / n + penalty * theta
        hess = (xa * (sw * p * (1 - p))[:, None]).T @ xa / n + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        theta -= step
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


def fit_head(x: np.ndarray, positive: np.ndarray, l2: float = 1e-2) -> LogisticHead:
    """Standardise the design matrix, then fit the logistic regression."""
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-9] = 1.0
    w, b = fit_logistic((x - mean) / scale, positive.astype(np.float64), l2)
    return LogisticHead(mean, scale, w, b)


@dataclass(frozen=True)
class Combiner:
    """Turns the two heads' logits into ``P(bad)``; ``trust = 1 - P(bad)``.

    ``mixture`` (``coef = [shift, 0, 0]``): ``P(bad) = p_adv + (1 - p_adv) p_mis`` with
    ``p_adv = sigmoid(logit_adv + shift)``: an input is adversarial, or clean and
    misclassified; ``shift`` moves the adversarial head's prior from its training mix to the
    stated share of adversarial inputs. ``logistic``: ``P(bad) = sigmoid(c0 + c1 logit_mis +
    c2 logit_adv)`` fitted on the mixed calibration stream."""

    coef: np.ndarray  # (3,)
    mixture: bool = False

    def parts(self, logit_mis: np.ndarray, logit_adv: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """The misclassification and adversarial shares of the evidence for ``bad``."""
        if self.mixture:
            p_adv = sigmoid(logit_adv + self.coef[0])
            return (1.0 - p_adv) * sigmoid(logit_mis), p_adv
        return self.coef[1] * logit_mis, self.coef[2] * logit_adv

    def trust(self, logit_mis: np.ndarray, logit_adv: np.ndarray) -> np.ndarray:
        mis, adv = self.parts(logit_mis, logit_adv)
        if self.mixture:
            return 1.0 - (mis + adv)
        return 1.0 - sigmoid(self.coef[0] + mis + adv)


def fit_combiner(logit_mis: np.ndarray, logit_adv: np.ndarray, bad: np.ndarray,
                 sample_weight: np.ndarray | None = None) -> Combiner:
    x = np.stack([logit_mis, logit_adv], axis=1)
    w, b = fit_logistic(x, bad.astype(np.float64), l2=1e-4, sample_weight=sample_weight)
    return Combiner(np.array([b, w[0], w[1]], dtype=np.float64))


def mixture_combiner(n_negative: int, n_adversarial: int, fraction: float) -> Combiner:
    """The mixture combiner for an adversarial head trained on ``n_negative`` clean and
    ``n_adversarial`` adversarial inputs, deployed where ``fraction`` of inputs are
    adversarial."""
    train_log_odds = np.log(n_adversarial / n_negative)
    target_log_odds = np.log(fraction / (1.0 - fraction))
    return Combiner(np.array([target_log_odds - train_log_odds, 0.0, 0.0]), mixture=True)
