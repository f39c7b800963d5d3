"""Class-conditional Gaussians with a shared covariance (Mahalanobis distances)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class ClassGaussians:
    """Class means ``(C, D)`` and a whitening matrix ``L (D, D)`` with ``L L^T = Sigma^-1``.

    Distances are computed in the whitened space: ``|x L - mu_c L|^2``."""

    means: np.ndarray
    whiten: np.ndarray

    @cached_property
    def whiten64(self) -> np.ndarray:
        return self.whiten.astype(np.float64)

    @cached_property
    def whitened_means(self) -> np.ndarray:
        return self.means.astype(np.float64) @ self.whiten64

    def sq_distances(self, x: np.ndarray, whitened_means: np.ndarray | None = None
                     ) -> np.ndarray:
        """Squared Mahalanobis distance of each row of ``x`` to each class: ``(N, C)``.

        Computed in float64 from explicit differences (no ``|a|^2 - 2ab + |b|^2``
        cancellation), so float32 noise in the features does not move the scores."""
        mw = self.whitened_means if whitened_means is None else whitened_means
        xw = np.asarray(x, dtype=np.float64) @ self.whiten64
        diff = xw[:, None, :] - mw[None, :, :]
        return np.einsum("ncd,ncd->nc", diff, diff)

def fit_class_gaussians(x: np.ndarray, labels: np.ndarray, num_classes: int,
                        shrinkage: float = 1e-3) -> ClassGaussians:
    """Means per class and the pooled within-class covariance, shrunk towards its mean
    variance by ``shrinkage`` for a stable inverse. Classes without samples get the
    global mean."""
    x = x.astype(np.float64)
    d = x.shape[1]
    means = np.tile(x.mean(0), (num_classes, 1))
    centred = np.empty_like(x)
    for c in range(num_classes):
        rows = labels == c
        if rows.any():
            means[c] = x[rows].mean(0)
        centred[rows] = x[rows] - means[c]
    cov = centred.T @ centred / max(len(x) - num_classes, 1)
    cov = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
    evals, evecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, 1e-12 * max(float(evals.max()), 1e-12))
    whiten = evecs / np.sqrt(evals)[None, :]
    return ClassGaussians(means.astype(np.float32), whiten.astype(np.float32))
