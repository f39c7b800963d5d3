"""Label feedback without a shared store of predictions: signed receipts.

Every scored input gets a *receipt*: ``cg1.<payload>.<signature>``, where the payload is the
base64url JSON array of the request id, the input's index in the request, the predicted class
index, the decision, the reason kind, the issue time (Unix seconds), the bank id and a random
nonce per request (so two requests that reuse a client's request id stay apart), and the
signature is HMAC-SHA256 of ``cg1.<payload>`` under the feedback key (the token's format:
:func:`service.codecs.issue_receipts` and :func:`service.codecs.read_receipt`).
``POST /v1/feedback`` takes a receipt and the true label: any worker or replica holding the
same key checks it without having seen the request.

The key: ``CONCEPTGUARD_FEEDBACK_KEY`` (at least 16 characters) when set; otherwise a random
key made by the first worker and written to the shared state folder
(``CONCEPTGUARD_STATE_DIR``, else ``PROMETHEUS_MULTIPROC_DIR``) as
``conceptguard-feedback.key``, which every worker on the host reads; without such a folder
(one worker), a random key that lives as long as the process.

A label counts once per input: the ids already counted are kept in a SQLite table in the
state folder (in memory without one) and forgotten once their receipt has expired
(``CONCEPTGUARD_FEEDBACK_TTL_S``), so the table holds at most the labels of one TTL, and at
most ``CONCEPTGUARD_FEEDBACK_MAX_SEEN`` of them (beyond: 503 until old ones expire). The
table is shared by the workers of one host and survives a restart when the folder does; two
hosts with separate folders each count a duplicate once.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.codecs import Receipt, read_receipt
from service.errors import ServiceError
from service.shared_state import connect, state_folder

KEY_FILE = "conceptguard-feedback.key"
SEEN_FILE = "conceptguard-feedback.sqlite"
PURGE_EVERY_S = 60.0


# ---------------------------------------------------------------- the key


def resolve_key(configured: str | None, folder: Path | None) -> bytes:
    """The configured key; else the state folder's (made by the first worker to ask); else
    a random key for this process."""
    if configured:
        return configured.encode()
    if folder is None:
        return secrets.token_bytes(32)
    path = folder / KEY_FILE
    if not path.exists():
        tmp = folder / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and never replaces the key another worker made
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise RuntimeError(f"{path} holds no usable feedback key; delete it to make a new one")
    return key


# ---------------------------------------------------------------- inputs counted once


class SeenStore:
    """Input ids whose label was counted, with the issue time of their receipt; ids older
    than ``ttl_s`` are dropped (their receipts are refused anyway)."""

    def __init__(self, path: Path | None, ttl_s: int, max_entries: int):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._db = connect(path, ("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, "
                                  "ts INTEGER NOT NULL)",
                                  "CREATE INDEX IF NOT EXISTS seen_ts ON seen (ts)"))
        self._next_purge = 0.0
        self._count = 0

    def add(self, input_id: str, issued_at: int, now: float) -> bool:
        """True when ``input_id`` was not counted before (and is now)."""
        with self._lock:
            if now >= self._next_purge:
                self._purge(now)
            if self._count >= self.max_entries:
                if self._db.execute("SELECT 1 FROM seen WHERE id = ?",
                                    (input_id,)).fetchone() is not None:
                    return False  # a repeat is answered even when the table is full
                self._purge(now)
                if self._count >= self.max_entries:
                    raise ServiceError(f"{self._count} labels of the last "
                                       f"{self.ttl_s} s are held (CONCEPTGUARD_FEEDBACK_"
                                       "MAX_SEEN); retry later", 503, "feedback_full")
            cur = self._db.execute("INSERT OR IGNORE INTO seen (id, ts) VALUES (?, ?)",
                                   (input_id, issued_at))
            added = cur.rowcount == 1
            self._count += int(added)
            return added

    def _purge(self, now: float) -> None:
        self._db.execute("DELETE FROM seen WHERE ts < ?", (int(now) - self.ttl_s,))
        self._count = int(self._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0])
        self._next_purge = now + PURGE_EVERY_S

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---------------------------------------------------------------- the book


@dataclass(frozen=True)
class Outcome:
    receipt: Receipt
    counted: bool
    correct: bool


class FeedbackBook:
    """Holds the receipts' key (the codecs sign with it: :func:`service.codecs.
    issue_receipts`) and takes labels (one per process; see the module docstring)."""

    def __init__(self, key: bytes, seen: SeenStore, ttl_s: int):
        self.key = key
        self.seen = seen
        self.ttl_s = ttl_s

    def take(self, token: str, label_index: int, bank_id: str, request_id: str | None = None,
             now: float | None = None) -> Outcome:
        """Check a receipt (403 forged; 404 expired, of a bank no longer served, or not of
        ``request_id`` when given) and count its label once."""
        now = time.time() if now is None else now
        receipt = read_receipt(token, self.key)
        if request_id is not None and request_id != receipt.request_id:
            raise ServiceError(f"request {request_id} is not the request of this receipt",
                               404, "not_found")
        if receipt.issued_at + self.ttl_s < now:
            raise ServiceError(f"receipt of request {receipt.request_id} expired (older than "
                               f"{self.ttl_s} s, CONCEPTGUARD_FEEDBACK_TTL_S)", 404,
                               "not_found")
        if receipt.bank_id != bank_id:
            raise ServiceError(f"receipt of request {receipt.request_id} is for bank "
                               f"{receipt.bank_id}, which is no longer served", 404,
                               "not_found")
        counted = self.seen.add(receipt.input_id, receipt.issued_at, now)
        return Outcome(receipt, counted, label_index == receipt.class_index)


_BOOK_LOCK = threading.Lock()


def app_book(app: Any) -> FeedbackBook:
    """The app's feedback book (one per process), made on first use from its settings
    (``app.state.settings``): it issues the receipts of the v1 and v2 answers and takes
    them back in ``POST /v1/feedback``."""
    got = getattr(app.state, "feedback_book", None)
    if got is not None:
        return got
    with _BOOK_LOCK:
        got = getattr(app.state, "feedback_book", None)
        if got is None:
            s = app.state.settings
            folder = state_folder()
            key = resolve_key(s.feedback_key.get_secret_value() if s.feedback_key else None,
                              folder)
            seen = SeenStore(None if folder is None else folder / SEEN_FILE,
                             s.feedback_ttl_s, s.feedback_max_seen)
            got = app.state.feedback_book = FeedbackBook(key, seen, s.feedback_ttl_s)
    return got
