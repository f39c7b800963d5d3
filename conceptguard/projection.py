"""Concept scores from features: the one implementation, for numpy arrays and torch tensors.

Only Python operators are used (``@``, ``*``, ``/``, ``**``, ``.sum``, indexing), so the same
function runs on numpy in the offline job and the sidecar path, and inside the exported
ONNX graph (traced from torch) on the serving path.

Precision: the standardisation divides by per-concept spreads that can be small next to
the common part of the cosines, which magnifies float32 rounding (~1e-4..1e-3 in s^ when the
aligner explains little). The served ONNX graph computes in float32 (a float64 MatMul costs
~20% of the classifier on CPU); the offline job fits and evaluates the monitor on that
graph's own outputs, so service and evaluation agree exactly. The numpy entry point below
(sidecar mode) computes in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np

Array = TypeVar("Array")  # np.ndarray or torch.Tensor

_EPS = 1e-12


def unit_rows(x: Array) -> Array:
    """Rows divided by their L2 norm (zero rows stay ~zero)."""
    return x / (((x * x).sum(-1)[..., None]) ** 0.5 + _EPS)


def aligned_embedding(z: Array, W: Array, b: Array) -> Array:
    """Features mapped into the VLM image space and normalised: ``normalise(z W + b)``."""
    return unit_rows(z @ W + b)


def raw_concept_scores(z: Array, W: Array, b: Array, T: Array) -> Array:
    """``s_k = cos(z W + b, t_k)``; ``T`` holds the unit concept vectors as rows ``(K, m)``."""
    return aligned_embedding(z, W, b) @ T.T


def standardise(s: Array, mu: Array, sigma: Array) -> Array:
    return (s - mu) / sigma


def concept_scores(z: Array, W: Array, b: Array, T: Array, mu: Array, sigma: Array) -> Array:
    """Standardised concept scores ``s^ = (cos(z W + b, T) - mu) / sigma``."""
    return standardise(raw_concept_scores(z, W, b, T), mu, sigma)


PROJECTION_KEYS = ("aligner.W", "aligner.b", "concepts.T", "projection.mu", "projection.sigma")


def project_features(z: np.ndarray, projection: Mapping[str, np.ndarray]) -> np.ndarray:
    """numpy entry point: float64 concept scores of features ``z`` with the bank's
    projection tensors (keys :data:`PROJECTION_KEYS`), returned as float32."""
    args = [np.asarray(projection[k], dtype=np.float64) for k in PROJECTION_KEYS]
    return concept_scores(np.asarray(z, dtype=np.float64), *args).astype(np.float32)
