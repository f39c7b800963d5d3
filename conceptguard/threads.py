"""Thread settings for the small linear algebra of the monitor."""

from __future__ import annotations


def single_threaded_blas() -> None:
    """Limit BLAS (OpenBLAS/MKL behind numpy) to one thread in this process.

    The monitor's products are small (a batch times d x d, K x m). With several BLAS threads
    they spin-wait against the inference runtime's own threads and other processes: on
    2 busy cores a 64x128 @ 128x128 product took 23 ms instead of 0.12 ms. Call once at
    startup (the service, the offline job and the benchmarks do)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
