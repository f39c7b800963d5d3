"""Stage timing and progress lines for the offline job."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stage(name: str, timings: dict[str, float], quiet: bool = False) -> Iterator[None]:
    """Print the stage's start and wall time; record it in ``timings`` (seconds)."""
    if not quiet:
        print(f"▶ {name} …", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 3)
    if not quiet:
        print(f"✓ {name}: {timings[name]:.1f} s", file=sys.stderr, flush=True)
