"""``/v1/admin/operating-point``: read or choose the reject threshold from the bank's stored
operating curve at serve time (see :mod:`service.operating`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from conceptguard.operating_point import OperatingTarget
from service.admin_auth import authorize
from service.codecs import parse_json
from service.errors import ServiceError
from service.lifecycle import SharedBank
from service.middleware import JSON_CHECKED_KEY
from service.operating import NoOperatingCurve, threshold_view
from service.runtime_state import RuntimeState
from service.schemas import ErrorResponse

router = APIRouter()

PATH = "/v1/admin/operating-point"
WAIT_S = 60.0  # longest wait for every worker to serve the new point (as for a reload)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"


async def _body(request: Request) -> Any:
    settings = request.app.state.settings
    return parse_json(await request.body(), settings.max_json_depth,
                      guarded=bool(request.scope.get(JSON_CHECKED_KEY)))


async def _answer(request: Request, loaded: Any, status: str, publish: bool = False
                  ) -> JSONResponse:
    """The threshold in use; after a change with several workers (a shared state folder),
    the change is published through the bank pointer and the answer comes once every live
    worker serves it (``workers``, as for a reload)."""
    out: dict[str, Any] = {"status": status, "threshold": threshold_view(loaded)}
    shared: SharedBank | None = getattr(request.app.state, "shared_bank", None)
    if publish and shared is not None:
        state: RuntimeState = request.app.state.runtime_state
        t = state.operating_target
        generation = shared.publish(state.bank_ref, None if t is None
                                    else f"{t.target}:{t.value:g}")
        out["workers"] = await shared.wait_all(generation, WAIT_S)
    elif publish:
        out["workers"] = {"generation": None, "workers": 1, "serving": 1, "failed": 0,
                          "all_serving": True}
    return JSONResponse(out)


@router.get(PATH, summary="The reject threshold in use and where it comes from")
async def get_operating_point(request: Request) -> JSONResponse:
    state: RuntimeState = request.app.state.runtime_state
    return await _answer(request, state.require(), "current")


@router.put(PATH, responses={400: {"model": ErrorResponse, "description": "not JSON"},
                             401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                             409: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/json": {"schema": OperatingTarget.model_json_schema()}}}},
            summary="Choose the reject threshold for a coverage or risk target (admin)")
async def put_operating_point(request: Request) -> JSONResponse:
    """``Authorization: Bearer <admin token>``; body ``{"target": "coverage" |
    "accept_correct" | "risk", "value": V}`` with V in (0, 1). The threshold is read from
    the bank's operating curve: 409 when the bank has none, 422 when the body is invalid or
    the target unreachable on the curve (the current threshold keeps serving)."""
    authorize(request, request.app.state.settings)
    try:
        target = OperatingTarget.model_validate(await _body(request))
    except ValidationError as exc:
        raise ServiceError(f"expected {{\"target\": \"coverage\" | \"accept_correct\" | "
                           f"\"risk\", \"value\": <number in (0, 1)>}}: {_first_error(exc)}",
                           422, "invalid_request") from exc
    state: RuntimeState = request.app.state.runtime_state
    state.require()
    try:
        loaded = await state.set_operating_point(target)
    except NoOperatingCurve as exc:
        raise ServiceError(str(exc), 409, "no_operating_curve") from exc
    except ValueError as exc:  # UnreachableTarget
        raise ServiceError(str(exc), 422, "unreachable_target") from exc
    return await _answer(request, loaded, "set", publish=True)


@router.delete(PATH, responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
               summary="Serve the bank's own threshold again (admin)")
async def delete_operating_point(request: Request) -> JSONResponse:
    authorize(request, request.app.state.settings)
    state: RuntimeState = request.app.state.runtime_state
    state.require()
    return await _answer(request, await state.set_operating_point(None), "bank", publish=True)
