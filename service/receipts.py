"""Receipts in the answers: the request id and one signed receipt per scored input, put
into the v1 bodies and the v2 response ``parameters`` (``POST /v1/feedback`` takes a receipt
back, :mod:`service.routes_feedback`); the book that signs and checks them is made once
per app, on first use."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import Request

from conceptguard.scoring import Scores
from service import request_ids
from service.feedback import SEEN_FILE, FeedbackBook, SeenStore, resolve_key, state_folder
from service.runtime_state import Loaded
from service.settings import Settings

_LOCK = threading.Lock()


def book(app: Any) -> FeedbackBook:
    """This process's feedback book, made on first use from the settings."""
    got = getattr(app.state, "feedback_book", None)
    if got is not None:
        return got
    with _LOCK:
        got = getattr(app.state, "feedback_book", None)
        if got is None:
            s: Settings = app.state.settings
            folder = state_folder()
            key = resolve_key(s.feedback_key.get_secret_value() if s.feedback_key else None,
                              folder)
            seen = SeenStore(None if folder is None else folder / SEEN_FILE,
                             s.feedback_ttl_s, s.feedback_max_seen)
            got = app.state.feedback_book = FeedbackBook(key, seen, s.feedback_ttl_s)
    return got


def receipts(request: Request, loaded: Loaded, scores: Scores) -> tuple[str, list[str]]:
    """The request id and one receipt per scored input."""
    rid = request_ids.of(request.scope)
    return rid, book(request.app).issue(rid, loaded.bank_id, scores.predictions.tolist(),
                                        scores.reject.tolist(), list(scores.reason))


def attach_v1(request: Request, loaded: Loaded, scores: Scores, body: dict[str, Any]
              ) -> dict[str, Any]:
    """``request_id`` in the body and ``receipt`` in each result (or the single answer)."""
    rid, tokens = receipts(request, loaded, scores)
    if "results" in body:
        for item, token in zip(body["results"], tokens, strict=True):
            item["receipt"] = token
    else:
        body["receipt"] = tokens[0]
    body["request_id"] = rid
    return body


def v2_parameters(request: Request, loaded: Loaded, scores: Scores) -> dict[str, Any]:
    """The v2 response's ``parameters``: the request id and the receipts of the inputs in
    order, comma-separated (Open Inference Protocol parameters are scalars; a receipt has
    no comma)."""
    rid, tokens = receipts(request, loaded, scores)
    return {"request_id": rid, "receipts": ",".join(tokens)}
