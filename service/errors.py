"""Every error the service answers with: one base class, one renderer.

A :class:`ServiceError` carries the HTTP ``status``, a stable ``code`` (the label of
``conceptguard_bad_requests_total`` for 4xx), the ``message`` and optional ``headers``; the
specific errors below only fix those fields. The app has one handler (``service.app``) that
turns any exception into a :class:`ServiceError` (:func:`as_service_error`) and renders it
(:func:`error_response`); the middleware and the gRPC server use the same two functions.

``ServiceError`` derives from Starlette's ``HTTPException`` so that FastAPI passes it on
unchanged when it is raised while a request body is read (``BodyTooLarge``,
``BodyTimeout``); it is otherwise independent of HTTP (gRPC maps ``status`` to a code).

Body shape: v1 ``{"error": {"code": ..., "message": ...}}``; v2 (paths under ``/v2``,
the Open Inference Protocol) ``{"error": "<message>"}``. Every 503 carries ``Retry-After``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service import metrics

log = logging.getLogger("conceptguard.service")


class ServiceError(StarletteHTTPException):
    """A request the service refuses or cannot answer; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request",
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, {self.status}, {self.code!r})"


class QueueFull(ServiceError):
    """The bounded queue cannot take the submitted items now; retry later."""

    def __init__(self, pending: int, requested: int, capacity: int):
        super().__init__(f"the queue is full: {pending} images pending, {requested} more "
                         f"requested, capacity {capacity}; retry later", 503, "queue_full")
        self.pending = pending
        self.requested = requested
        self.capacity = capacity


class BatcherClosed(ServiceError):
    """The batcher was shut down before the item ran."""

    def __init__(self, message: str = "the service is shutting down"):
        super().__init__(message, 503, "shutting_down")


class NotReady(ServiceError):
    """No bank is loaded (starting up or shutting down)."""

    def __init__(self, message: str = "the bank is still loading; retry shortly"):
        super().__init__(message, 503, "not_ready")


class BodyTooLarge(ServiceError):
    """The request body passes ``CONCEPTGUARD_MAX_UPLOAD_BYTES`` (raised from ``receive``)."""

    def __init__(self, limit: int, size: int | None = None):
        told = f"is {size} bytes" if size is not None else f"exceeds {limit} bytes"
        super().__init__(f"the request body {told}; the limit is {limit} bytes "
                         "(CONCEPTGUARD_MAX_UPLOAD_BYTES)", 413, "too_large")


class BodyTimeout(ServiceError):
    """The client stalled while sending the body (Slowloris on the body)."""

    def __init__(self, seconds: float):
        super().__init__(f"no request body data for {seconds:g} s "
                         "(CONCEPTGUARD_BODY_TIMEOUT_S)", 408, "timeout",
                         {"Connection": "close"})


class ClientClosed(ServiceError):
    """The client closed the connection (or cancelled its call) before it was answered:
    nothing reaches it; counted as 499, nginx's status for this, not as a server error."""

    def __init__(self) -> None:
        super().__init__("the client closed the connection before it was answered", 499,
                         "client_closed")


# codes of the framework's own HTTP errors (unknown route, wrong method, ...)
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "timeout", 413: "too_large",
               415: "unsupported_media_type", 422: "invalid_request"}


def as_service_error(exc: BaseException, content_type: str = "") -> ServiceError:
    """Any exception as the :class:`ServiceError` to answer with (unknown ones: 500,
    logged by the caller). ``content_type``: the request's, for validation errors."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, ClientDisconnect):
        return ClientClosed()
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc, content_type)
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            code = "invalid_json"  # FastAPI's own JSON parse failure
        return ServiceError(str(exc.detail), exc.status_code, code,
                            dict(exc.headers) if exc.headers else None)
    if isinstance(exc, RecursionError):
        return ServiceError("the request JSON is nested too deeply "
                            "(CONCEPTGUARD_MAX_JSON_DEPTH)", 400, "invalid_json")
    return ServiceError(f"internal error: {type(exc).__name__}", 500, "internal")


def _validation_error(exc: RequestValidationError, content_type: str) -> ServiceError:
    ctype = content_type.split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        return ServiceError(f"unsupported content type {ctype!r}: send application/json",
                            415, "unsupported_media_type")
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return ServiceError("the request body is not valid JSON", 400, "invalid_json")
    return invalid_request(errors)


def invalid_request(errors: Sequence[Mapping[str, Any]]) -> ServiceError:
    """422 naming the first few fields that failed validation (FastAPI's or pydantic's
    ``errors()``), e.g. ``inputs: Field required``."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return ServiceError("; ".join(parts) or "the request failed validation", 422,
                        "invalid_request")


def error_response(path: str, err: ServiceError, retry_after_s: int = 1) -> JSONResponse:
    """The response for ``err`` on a request to ``path`` (v1 or v2 body); counts 4xx."""
    if 400 <= err.status < 500:
        metrics.bad_request(err.code)
    body: dict[str, Any] = ({"error": err.message} if path.startswith("/v2")
                            else {"error": {"code": err.code, "message": err.message}})
    headers = dict(err.headers) if err.headers else {}
    if err.status == 503:
        headers.setdefault("Retry-After", str(retry_after_s))
    return JSONResponse(body, status_code=err.status, headers=headers or None)
