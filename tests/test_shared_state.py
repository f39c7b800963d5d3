"""The workers' shared SQLite databases: opening one at the same moment from several
processes (every worker's first request) never fails with "database is locked"."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from service.shared_state import connect

SCHEMA = ("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, ts INTEGER NOT NULL)",
          "CREATE INDEX IF NOT EXISTS seen_ts ON seen (ts)")
PROCESSES = 4
ROUNDS = 60  # each a fresh database opened by every process at once


def _open_at_once(path: str, barrier: object) -> str:
    """Wait for the other processes, then open the database with its schema; the error's
    text ('' when none)."""
    barrier.wait()  # type: ignore[attr-defined]
    try:
        db = connect(Path(path), SCHEMA)
        db.execute("INSERT OR IGNORE INTO seen (id, ts) VALUES ('x', 1)")
        db.close()
        return ""
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"


def test_workers_opening_a_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    # Without retries SQLite refuses the loser of the race to switch a new file to the
    # write-ahead log at once ("database is locked"; measured: about one round in 15 of
    # four processes). A 500 on a worker's first request came from this.
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager, ctx.Pool(PROCESSES) as pool:
        barrier = manager.Barrier(PROCESSES)
        errors = []
        for k in range(ROUNDS):
            path = str(tmp_path / f"state-{k}.sqlite")
            errors += [e for e in pool.starmap(_open_at_once, [(path, barrier)] * PROCESSES)
                       if e]
    assert errors == []
    db = sqlite3.connect(tmp_path / f"state-{ROUNDS - 1}.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM seen").fetchone()[0] == 1


def test_an_error_other_than_a_lock_is_raised_at_once(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError, match="syntax error"):
        connect(tmp_path / "x.sqlite", ("CREATE TABLE broken x y",))


def test_without_a_path_the_database_is_private_and_in_memory() -> None:
    a, b = connect(None, SCHEMA), connect(None, SCHEMA)
    a.execute("INSERT INTO seen (id, ts) VALUES ('x', 1)")
    assert b.execute("SELECT COUNT(*) FROM seen").fetchone()[0] == 0
