"""Affine aligner from classifier features into the VLM image space (Text-to-Concept).

Closed-form ridge regression ``u = z @ W + b``; the regularisation is chosen on a held-out
slice of the fit split, then the map is refitted on the whole fit split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_LAMBDAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclass(frozen=True)
class Aligner:
    """``W`` is ``(d, m)``, ``b`` is ``(m,)``; ``lam`` the chosen ridge strength
    (relative to the mean squared singular value of the centred features)."""

    W: np.ndarray
    b: np.ndarray
    lam: float

    def transform(self, z: np.ndarray) -> np.ndarray:
        return z @ self.W + self.b


def _ridge_path(z: np.ndarray, v: np.ndarray, lambdas: tuple[float, ...]) -> list[Aligner]:
    """Ridge solutions for every lambda via one SVD of the centred design."""
    z_mean, v_mean = z.mean(0), v.mean(0)
    zc, vc = z - z_mean, v - v_mean
    u, s, vt = np.linalg.svd(zc.astype(np.float64), full_matrices=False)
    uty = u.T @ vc.astype(np.float64)
    scale = float(np.mean(s**2)) if s.size else 1.0
    out = []
    for lam in lambdas:
        shrink = s / (s**2 + lam * scale)
        w = (vt.T * shrink) @ uty
        b = v_mean - z_mean @ w
        out.append(Aligner(w.astype(np.float32), b.astype(np.float32), float(lam)))
    return out


def r2_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Coefficient of determination pooled over all output dimensions."""
    sse = float(((target - pred) ** 2).sum())
    sst = float(((target - target.mean(0)) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else 0.0


def mean_cosine(pred: np.ndarray, target: np.ndarray) -> float:
    pn = pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
    tn = target / np.maximum(np.linalg.norm(target, axis=1, keepdims=True), 1e-12)
    return float((pn * tn).sum(1).mean())


def fit_aligner(
    z: np.ndarray,
    v: np.ndarray,
    *,
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
    holdout_fraction: float = 0.2,
    seed: int = 0,
) -> Aligner:
    """Choose lambda by held-out MSE on a seeded slice of ``(z, v)``, refit on everything."""
    if len(z) != len(v):
        raise ValueError(f"aligner: {len(z)} feature rows but {len(v)} VLM rows")
    if len(z) < 10:
        raise ValueError("aligner: need at least 10 samples to fit")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(z))
    n_val = max(1, round(holdout_fraction * len(z)))
    val, tr = order[:n_val], order[n_val:]
    candidates = _ridge_path(z[tr], v[tr], lambdas)
    errors = [float(((c.transform(z[val]) - v[val]) ** 2).mean()) for c in candidates]
    best = lambdas[int(np.argmin(errors))]
    return _ridge_path(z, v, (best,))[0]
