"""``POST /v1/feedback``: a true label for a scored input, by its receipt (the receipts are
issued with the v1 and v2 answers, :func:`service.feedback.app_book`)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from service import metrics
from service.errors import ServiceError
from service.feedback import app_book
from service.runtime_state import RuntimeState
from service.schemas import ErrorResponse

router = APIRouter()


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    receipt: str = Field(min_length=1, max_length=4096,
                         description="the receipt of the input, from its answer")
    # strict: a JSON true or 4.0 is not a class (lax mode counted them as classes 1 and 4)
    label: StrictStr | StrictInt = Field(description="the true class: its name or its index")
    request_id: str | None = Field(None, max_length=128,
                                   description="optional: must be the receipt's request id")


class FeedbackResponse(BaseModel):
    request_id: str
    index: int = Field(description="the input's position in its request")
    counted: bool = Field(description="false: a label for this input was already counted")
    correct: bool = Field(description="the label is the predicted class")
    decision: Literal["accept", "reject"]
    reason: str


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
    outcome = app_book(request.app).take(body.receipt, label, loaded.bank_id, body.request_id)
    r = outcome.receipt
    decision = "reject" if r.reject else "accept"
    reason = metrics.REJECT_REASON_LABELS.get(r.reason, "accepted")
    if outcome.counted:
        metrics.feedback(loaded.model_name, decision, reason, outcome.correct)
    return JSONResponse({"request_id": r.request_id, "index": r.index,
                         "counted": outcome.counted, "correct": outcome.correct,
                         "decision": decision, "reason": reason})
