"""``POST /v1/feedback`` (a true label for a scored input, by its receipt) and the helpers
that put the request id and the receipts into the v1 and v2 answers."""

from __future__ import annotations

import threading
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from conceptguard.scoring import Scores
from service import metrics, request_ids
from service.errors import ServiceError
from service.feedback import SEEN_FILE, FeedbackBook, SeenStore, resolve_key, state_folder
from service.runtime_state import Loaded, RuntimeState
from service.schemas import ErrorResponse
from service.settings import Settings

router = APIRouter()
_LOCK = threading.Lock()


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    receipt: str = Field(min_length=1, max_length=4096,
                         description="the receipt of the input, from its answer")
    label: str | int = Field(description="the true class: its name or its index")
    request_id: str | None = Field(None, max_length=128,
                                   description="optional: must be the receipt's request id")


class FeedbackResponse(BaseModel):
    request_id: str
    index: int = Field(description="the input's position in its request")
    counted: bool = Field(description="false: a label for this input was already counted")
    correct: bool = Field(description="the label is the predicted class")
    decision: Literal["accept", "reject"]
    reason: str


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


def _label_index(label: str | int, classes: list[str]) -> int:
    if isinstance(label, int):
        if not 0 <= label < len(classes):
            raise ServiceError(f"label: class index {label} is not in 0..{len(classes) - 1}",
                               422, "invalid_request")
        return label
    try:
        return classes.index(label)
    except ValueError:
        raise ServiceError(f"label: {label!r} is not a class of the bank", 422,
                           "invalid_request") from None


@router.post("/v1/feedback", response_model=FeedbackResponse,
             responses={403: {"model": ErrorResponse, "description": "forged receipt"},
                        404: {"model": ErrorResponse,
                              "description": "expired receipt, or of another request or bank"},
                        422: {"model": ErrorResponse, "description": "not a receipt, or "
                                                                     "an unknown label"},
                        503: {"model": ErrorResponse, "description": "too many labels held"}},
             summary="The true label of a scored input, by its receipt")
def feedback(request: Request, body: FeedbackRequest) -> JSONResponse:  # sync: SQLite
    """Send the ``receipt`` of an input (from its v1 or v2 answer) and its true ``label``.
    A label counts once per input (``counted: false`` for a repeat); Prometheus gets the
    received and correct counts by decision and reason (the realised accuracy)."""
    state: RuntimeState = request.app.state.runtime_state
    loaded = state.require()
    label = _label_index(body.label, list(loaded.classes))
    outcome = book(request.app).take(body.receipt, label, loaded.bank_id, body.request_id)
    r = outcome.receipt
    decision = "reject" if r.reject else "accept"
    reason = metrics.REJECT_REASON_LABELS.get(r.reason, "accepted")
    if outcome.counted:
        metrics.feedback(loaded.model_name, decision, reason, outcome.correct)
    return JSONResponse({"request_id": r.request_id, "index": r.index,
                         "counted": outcome.counted, "correct": outcome.correct,
                         "decision": decision, "reason": reason})
