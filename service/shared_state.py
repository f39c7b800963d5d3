"""The state the workers of a host share: the state folder, and SQLite databases in it.

The folder is ``CONCEPTGUARD_STATE_DIR``, else ``PROMETHEUS_MULTIPROC_DIR`` (set for several
workers). The bank pointer (:mod:`service.lifecycle`), the feedback key and the labels
already counted (:mod:`service.feedback`) and the inference-logger halves waiting for their
pair (:mod:`service.sink`) live there; without a folder each worker keeps its own, in memory.
Whether a worker process is still alive (:func:`process_alive`) is asked of the same host.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

LOCK_WAIT_S = 10.0  # the longest wait for another worker's lock on the database


def state_folder() -> Path | None:
    """The shared state folder; None when neither variable names an existing folder."""
    folder = os.environ.get("CONCEPTGUARD_STATE_DIR") or os.environ.get(
        "PROMETHEUS_MULTIPROC_DIR")
    return Path(folder) if folder and os.path.isdir(folder) else None


def connect(path: Path | None, schema: Sequence[str] = ()) -> sqlite3.Connection:
    """A connection for one process's threads (callers serialise with their own lock) to
    the database at ``path`` (write-ahead log: readers do not block the writer of another
    worker; waits up to ``LOCK_WAIT_S`` for a lock), or to a private in-memory one;
    autocommit unless a transaction is begun explicitly. ``schema``: statements run once
    connected (``CREATE ... IF NOT EXISTS``).

    Workers that open a new database at the same moment (their first request) race to
    switch it to the write-ahead log and create its tables; SQLite answers the loser
    "database is locked" at once, without waiting (its busy timeout does not cover this),
    so these set-up statements are retried until ``LOCK_WAIT_S``."""
    db = sqlite3.connect(":memory:" if path is None else str(path), timeout=LOCK_WAIT_S,
                         check_same_thread=False, isolation_level=None)
    setup = [*(("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL") if path else ()),
             *schema]
    deadline = time.monotonic() + LOCK_WAIT_S
    try:
        for sql in setup:
            _execute_when_free(db, sql, deadline)
    except BaseException:
        db.close()
        raise
    return db


def _execute_when_free(db: sqlite3.Connection, sql: str, deadline: float) -> None:
    """``sql``, retried while another connection holds the lock (until ``deadline``)."""
    pause = 0.005
    while True:
        try:
            db.execute(sql)
            return
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if ("locked" not in text and "busy" not in text) or time.monotonic() >= deadline:
                raise
        time.sleep(pause * (1.0 + random.random()))  # jitter: the racers do not collide again
        pause = min(pause * 2.0, 0.1)


def process_alive(pid: int) -> bool:
    """False for a process that is gone, and for one that has exited and waits to be reaped
    (a zombie: a worker killed a moment ago, before its supervisor noticed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:  # no procfs here, or it went meanwhile: the signal's answer stands
        return True
    return stat.rpartition(b")")[2].split()[:1] != [b"Z"]
