"""Label feedback without a shared store of predictions: signed receipts.

Every scored input gets a *receipt*: ``cg1.<payload>.<signature>``, where the payload is the
base64url JSON array of the request id, the input's index in the request, the predicted class
index, the decision, the reason kind, the issue time (Unix seconds), the bank id and a random
nonce per request (so two requests that reuse a client's request id stay apart), and the
signature is HMAC-SHA256 of ``cg1.<payload>`` under the feedback key. ``POST /v1/feedback``
takes a receipt and the true label: any worker or replica holding the same key checks it
without having seen the request.

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

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import ServiceError
from service.shared_state import connect, state_folder

if TYPE_CHECKING:
    from conceptguard.scoring import Scores

PREFIX = "cg1"
KEY_FILE = "conceptguard-feedback.key"
SEEN_FILE = "conceptguard-feedback.sqlite"
PURGE_EVERY_S = 60.0


@dataclass(frozen=True)
class Receipt:
    """What a receipt certifies about one scored input."""

    request_id: str
    index: int
    class_index: int
    reject: bool
    reason: str  # accepted / misclassification-like / adversarial-like / unfamiliar
    issued_at: int  # Unix seconds
    bank_id: str
    nonce: str = ""  # random per request: clients may reuse request ids

    @property
    def input_id(self) -> str:
        """The id of the input (one request may hold several; two requests may share a
        client-supplied request id, never a nonce)."""
        return f"{self.request_id}#{self.index}#{self.nonce}"

    def payload(self) -> list[Any]:
        """The signed fields, in this order (a JSON array)."""
        return [self.request_id, self.index, self.class_index, self.reject, self.reason,
                self.issued_at, self.bank_id, self.nonce]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(receipt: Receipt, key: bytes) -> str:
    return _signed(json.dumps(receipt.payload(), separators=(",", ":")), key)


def _signed(payload_json: str, key: bytes) -> str:
    head = f"{PREFIX}.{_b64(payload_json.encode())}"
    mac = hmac.new(key, head.encode("ascii"), hashlib.sha256).digest()
    return f"{head}.{_b64(mac)}"


def sign_many(request_id: str, bank_id: str, issued_at: int, classes: list[int],
              rejects: list[bool], reasons: list[str], key: bytes, nonce: str = "") -> list[str]:
    """:func:`sign` for every input of a request: the same receipts, with the request's
    strings JSON-encoded once (a receipt per input costs one HMAC and some formatting)."""
    rid, bank, tail = json.dumps(request_id), json.dumps(bank_id), json.dumps(nonce)
    why = {r: json.dumps(r) for r in set(reasons)}
    return [_signed(f"[{rid},{i},{c},{'true' if r else 'false'},{why[w]},{issued_at},{bank},"
                    f"{tail}]", key)
            for i, (c, r, w) in enumerate(zip(classes, rejects, reasons, strict=True))]


def verify(token: str, key: bytes) -> Receipt:
    """The receipt a token certifies: 422 when it is not a receipt at all, 403 when its
    signature is not the service's (forged, altered, or signed under another key)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise ServiceError("receipt: not a conceptguard receipt (cg1.<payload>.<signature>)",
                           422, "invalid_request")
    head = f"{parts[0]}.{parts[1]}"
    try:
        mac = _unb64(parts[2])
    except (binascii.Error, ValueError):
        mac = b""
    want = hmac.new(key, head.encode("utf-8", "replace"), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, want):
        raise ServiceError("receipt: the signature does not match (forged, altered, or "
                           "issued under another feedback key)", 403, "forbidden")
    try:
        rid, index, cls, rej, why, ts, bank, nonce = json.loads(_unb64(parts[1]))
        return Receipt(request_id=str(rid), index=int(index), class_index=int(cls),
                       reject=bool(rej), reason=str(why), issued_at=int(ts), bank_id=str(bank),
                       nonce=str(nonce))
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:  # signed by us: only
        # a change of format makes it unreadable
        raise ServiceError("receipt: unreadable payload", 422, "invalid_request") from exc


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
    """Issues receipts and takes labels (one per process; see the module docstring)."""

    def __init__(self, key: bytes, seen: SeenStore, ttl_s: int):
        self.key = key
        self.seen = seen
        self.ttl_s = ttl_s

    def issue(self, request_id: str, bank_id: str, predictions: list[int],
              rejects: list[bool], reasons: list[str], now: float | None = None) -> list[str]:
        ts = int(time.time() if now is None else now)
        return sign_many(request_id, bank_id, ts, predictions, rejects, reasons, self.key,
                         secrets.token_hex(8))

    def issue_for(self, request_id: str, bank_id: str, scores: Scores) -> list[str]:
        """One receipt per scored input of a request, in order."""
        return self.issue(request_id, bank_id, scores.predictions.tolist(),
                          scores.reject.tolist(), list(scores.reason))

    def take(self, token: str, label_index: int, bank_id: str, request_id: str | None = None,
             now: float | None = None) -> Outcome:
        """Check a receipt (403 forged; 404 expired, of a bank no longer served, or not of
        ``request_id`` when given) and count its label once."""
        now = time.time() if now is None else now
        receipt = verify(token, self.key)
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
