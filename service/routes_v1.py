"""The v1 REST API: classify images, sidecar monitoring, bank summary and reload.

``POST /v1/classify`` is a hot route (:data:`HOT_ROUTES`): the middleware answers it with
:func:`classify_asgi`, a plain ASGI handler; the framework's route of the same path runs
the same :func:`classify_answer` and gives the OpenAPI document.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from conceptguard.bank import BankError
from conceptguard.scoring import Scores
from service import metrics
from service.admin_auth import authorize as _authorize
from service.codecs import (
    as_float_array,
    check_count,
    decode_base64,
    issue_receipts,
    json_bytes,
    parse_json,
    v1_body,
)
from service.dataplane import DataPlane
from service.errors import ServiceError
from service.lifecycle import SharedBank
from service.middleware import (
    JSON_CHECKED_KEY,
    HotRoute,
    latency_ms,
    request_id,
    send_json,
)
from service.runtime_state import Loaded, RuntimeState
from service.schemas import (
    BankSummary,
    BatchResponse,
    ClassifyJSONRequest,
    ClassifyResponse,
    ErrorResponse,
    MonitorRequest,
    ReloadRequest,
    ReloadResponse,
)
from service.settings import Settings

RELOAD_WAIT_S = 60.0  # longest wait for every worker to serve a reloaded bank

router = APIRouter(tags=["v1"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "bad input (undecodable image, bad base64, invalid JSON)"),
                       (413, "too large (body, pixels, image count)"),
                       (415, "unsupported image mode or content type"),
                       (422, "wrong shapes or values"),
                       (503, "queue full or not ready; see Retry-After"))
}

_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "file": {"type": "string", "format": "binary",
                             "description": "one image (single-object response)"},
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                              "description": "several images (batch response)"},
                }}},
            "application/json": {"schema": ClassifyJSONRequest.model_json_schema()},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _dataplane(request: Request) -> DataPlane:
    return request.app.state.dataplane


# ---------------------------------------------------------------- request parsing


async def read_images(request: Request, settings: Settings) -> tuple[list[bytes], bool]:
    """Image files from a multipart, JSON or raw-image body; ``single`` = one-object reply."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _read_multipart(request, settings)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return [await request.body()], True
    if ctype in ("", "application/json") or ctype.endswith("+json"):
        return await _read_json_images(request, settings)
    raise ServiceError(f"unsupported content type {ctype!r}: send multipart/form-data "
                       "(field 'file' or 'files'), application/json ({\"images\": [base64]}) "
                       "or a raw image/* body", 415, "unsupported_media_type")


def _boundary(request: Request) -> bytes | None:
    for part in request.headers.get("content-type", "").split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1", "replace")
    return None


async def _read_multipart(request: Request, settings: Settings) -> tuple[list[bytes], bool]:
    limit = settings.max_images_per_request
    body = await request.body()  # cached: the form parser reads it from here
    boundary = _boundary(request)
    if boundary is None:
        raise ServiceError("invalid multipart body: the Content-Type has no boundary", 400,
                           "invalid_multipart")
    if b"--" + boundary + b"--" not in body:
        raise ServiceError("invalid multipart body: truncated (no closing boundary)", 400,
                           "invalid_multipart")
    try:
        form = await request.form(max_files=limit + 1, max_fields=limit + 16)
    except StarletteHTTPException as exc:
        if "too many files" in str(exc.detail).lower():  # the parser stops past max_files
            check_count(limit + 2, limit, at_least=True)
        if exc.status_code in (408, 413):
            raise
        raise ServiceError(f"invalid multipart body: {exc.detail}", 400,
                           "invalid_multipart") from exc
    try:
        single = form.getlist("file")
        several = form.getlist("files")
        uploads = [*single, *several]
        if not uploads:
            raise ServiceError("the multipart body has no 'file' or 'files' field", 400,
                               "no_file")
        for u in uploads:
            if not isinstance(u, UploadFile):
                raise ServiceError("fields 'file' and 'files' must be file uploads", 400,
                                   "no_file")
        check_count(len(uploads), limit)
        blobs = [await u.read() for u in uploads if isinstance(u, UploadFile)]
    finally:
        await form.close()
    return blobs, len(single) == 1 and not several


async def _read_json_images(request: Request, settings: Settings) -> tuple[list[bytes], bool]:
    payload = await read_json(request)
    try:
        req = ClassifyJSONRequest.model_validate(payload)
    except ValidationError as exc:
        raise ServiceError(f"expected {{\"images\": [\"<base64>\", ...]}}: "
                           f"{_first_error(exc)}", 422, "invalid_request") from exc
    if (req.images is None) == (req.image is None):
        raise ServiceError("send exactly one of 'images' (a list of base64 images) or "
                           "'image' (one base64 image)", 422, "invalid_request")
    if req.image is not None:
        return [decode_base64(req.image, "image")], True
    assert req.images is not None
    check_count(len(req.images), settings.max_images_per_request)
    return [decode_base64(s, f"images[{i}]") for i, s in enumerate(req.images)], False


async def read_json(request: Request) -> Any:
    """The body as JSON (the middleware's JSON guard is not run again when it passed)."""
    settings: Settings = request.app.state.settings
    return parse_json(await request.body(), settings.max_json_depth,
                      guarded=bool(request.scope.get(JSON_CHECKED_KEY)))


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{loc}: {err['msg']}"


# ---------------------------------------------------------------- routes


def _v1_answer(request: Request, loaded: Loaded, scores: Scores, settings: Settings, *,
               single: bool) -> bytes:
    """The v1 answer as JSON bytes, with the request id and a receipt per input (signed
    under the feedback book's key, opened at startup)."""
    rid = request_id(request.scope)
    receipts = issue_receipts(request.app.state.feedback_book.key, rid, loaded.bank_id, scores)
    return json_bytes(v1_body(loaded, scores, settings, single=single,
                              latency_ms=latency_ms(request.scope), request_id=rid,
                              receipts=receipts))


async def classify_answer(request: Request) -> bytes:
    """``POST /v1/classify``: read the images, score them through the data plane, and the
    v1 answer (with the request id and a receipt per input) as JSON bytes."""
    dp = _dataplane(request)
    loaded = dp.state.serving or dp.state.require()  # not ready: 503 before the body is read
    blobs, single = await read_images(request, dp.settings)  # admitted by the middleware
    scores = await dp.classify_images(loaded, blobs)  # decode, batch run (runtime + scores)
    return _v1_answer(request, loaded, scores, dp.settings, single=single)


async def classify_asgi(scope: Scope, receive: Receive, send: Send,
                        params: dict[str, str]) -> None:
    """The hot route's handler (see the module docstring)."""
    await send_json(send, await classify_answer(Request(scope, receive)))


HOT_ROUTES = (HotRoute(re.compile(r"/v1/classify"), "/v1/classify", classify_asgi),)


@router.post("/v1/classify", response_model=ClassifyResponse | BatchResponse,
             responses=_ERRORS, openapi_extra=_CLASSIFY_BODY,
             summary="Classify images and judge each prediction")
async def classify(request: Request) -> Response:
    """Upload images as multipart (``file``: one image; ``files``: several), as JSON
    ``{"images": ["<base64>", ...]}`` (a batch) or ``{"image": "<base64>"}``, or as a raw
    ``image/*`` body. Returns the prediction, top-k probabilities, the calibrated trust,
    the reject decision with its reason and concepts, and both defect-head scores."""
    return Response(await classify_answer(request), media_type="application/json")


@router.post("/v1/monitor", response_model=BatchResponse, responses=_ERRORS,
             summary="Sidecar mode: judge predictions from features (and logits)")
async def monitor(request: Request, body: MonitorRequest) -> Response:
    """The classifier ran elsewhere: send its penultimate-layer ``features`` [N, d] and,
    optionally, its ``logits`` [N, C] (computed with the bank's classifier head if absent)."""
    dp = _dataplane(request)
    loaded = dp.state.require()
    features = as_float_array(body.features, "features")
    logits = None if body.logits is None else as_float_array(body.logits, "logits")
    scores = await dp.monitor(loaded, features, logits)
    return Response(_v1_answer(request, loaded, scores, dp.settings, single=False),
                    media_type="application/json")


@router.get("/v1/bank", response_model=BankSummary, summary="The bank being served")
async def bank(request: Request) -> JSONResponse:
    state: RuntimeState = request.app.state.runtime_state
    loaded = state.require()
    return JSONResponse(loaded.summary(state.bank_ref))


@router.post("/v1/bank/reload", response_model=ReloadResponse,
             responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                        422: {"model": ErrorResponse}},
             openapi_extra={"requestBody": {"required": False, "content": {
                 "application/json": {"schema": ReloadRequest.model_json_schema()}}}},
             summary="Load a bank beside the current one and swap atomically (admin)")
async def reload_bank(request: Request) -> JSONResponse:
    """``Authorization: Bearer <admin token>``; optional body ``{"path": "<bank folder>"}``
    (default: the current folder, e.g. after the offline job republished it). A bank that
    fails validation answers 422 and the current bank keeps serving."""
    settings: Settings = request.app.state.settings
    _authorize(request, settings)
    body = await request.body()
    path = None
    if body.strip():
        try:
            req = ReloadRequest.model_validate(await read_json(request))
        except ValidationError as exc:
            raise ServiceError(f"expected {{\"path\": \"<bank folder>\"}}: {_first_error(exc)}",
                               422, "invalid_request") from exc
        path = req.path
    state: RuntimeState = request.app.state.runtime_state
    state.require()
    try:
        new, old = await state.reload(path)
    except BankError as exc:
        metrics.reload_result(False)
        raise ServiceError(str(exc), 422, "invalid_bank") from exc
    metrics.reload_result(True)
    out: dict[str, Any] = {"status": "reloaded", "bank": new.bank_reference,
                           "previous": None if old is None else old.bank_reference,
                           "path": state.bank_ref}
    shared: SharedBank | None = getattr(request.app.state, "shared_bank", None)
    if shared is not None:  # several workers: move them all, answer when they serve it
        generation = shared.publish(state.bank_ref)
        out["workers"] = await shared.wait_all(generation, RELOAD_WAIT_S)
    else:
        out["workers"] = {"generation": None, "workers": 1, "serving": 1, "failed": 0,
                          "all_serving": True}
    return JSONResponse(out)
