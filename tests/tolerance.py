"""Float tolerances derived from the arithmetic, not picked by hand.

A float32 value carries a relative rounding error of at most ``EPS32 / 2`` per operation, and a
sum of ``n`` terms accumulates at most about ``n`` of them, relative to the *magnitude of the
terms* (not of the result, which can cancel). Two float32 computations of the same quantity by
different kernels (ONNX Runtime vs. torch, a fused graph vs. numpy, another CPU's SIMD width)
can therefore differ by about ``n * EPS32 * scale``, where ``scale`` is the size of the values
involved. These helpers compare with exactly that bound, times a small safety factor, so a
check holds on any CPU and still fails on a real difference (which is many orders larger).
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7
SAFETY = 4.0


def f32_tolerance(want: np.ndarray, terms: int, scale: float | None = None) -> float:
    """Absolute bound for float32 results of ``terms``-long accumulations of values whose
    size is ``scale`` (default: the largest |value| of ``want``, at least 1)."""
    if scale is None:
        scale = max(float(np.max(np.abs(want))) if np.size(want) else 0.0, 1.0)
    return SAFETY * terms * EPS32 * scale


def assert_f32_close(got: np.ndarray, want: np.ndarray, *, terms: int,
                     scale: float | None = None, err_msg: str = "") -> None:
    """``got`` equals ``want`` up to float32 rounding of ``terms``-term sums (see module)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    tol = f32_tolerance(want, terms, scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol,
                               err_msg=f"{err_msg} (float32 bound {tol:.2e})")
