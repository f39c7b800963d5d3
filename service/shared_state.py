"""The state the workers of a host share: the state folder, and SQLite databases in it.

The folder is ``CONCEPTGUARD_STATE_DIR``, else ``PROMETHEUS_MULTIPROC_DIR`` (set for several
workers). The bank pointer (:mod:`service.lifecycle`), the feedback key and the labels
already counted (:mod:`service.feedback`) and the inference-logger halves waiting for their
pair (:mod:`service.sink`) live there; without a folder each worker keeps its own, in memory.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def state_folder() -> Path | None:
    """The shared state folder; None when neither variable names an existing folder."""
    folder = os.environ.get("CONCEPTGUARD_STATE_DIR") or os.environ.get(
        "PROMETHEUS_MULTIPROC_DIR")
    return Path(folder) if folder and os.path.isdir(folder) else None


def connect(path: Path | None) -> sqlite3.Connection:
    """A connection for one process's threads (callers serialise with their own lock) to
    the database at ``path`` (write-ahead log: readers do not block the writer of another
    worker; waits up to 10 s for a lock), or to a private in-memory one; autocommit unless a
    transaction is begun explicitly."""
    db = sqlite3.connect(":memory:" if path is None else str(path), timeout=10.0,
                         check_same_thread=False, isolation_level=None)
    if path is not None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    return db
