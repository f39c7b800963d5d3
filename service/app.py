"""The FastAPI application: lifespan (settings, bank, runtime, batcher), middleware, errors.

``uvicorn service.app:app`` serves the bank named by ``CONCEPTGUARD_BANK``. Importing this
module needs no bank: settings are read and the bank is loaded at startup (lifespan), and a
bad setting or bank stops the startup with a message naming it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conceptguard.bank import BankError
from conceptguard.imaging import ImageError
from conceptguard.threads import single_threaded_blas
from service import metrics
from service.batching import BatcherClosed, QueueFull
from service.dataplane import DataPlane, ServiceError
from service.report_route import router as report_router
from service.routes_v1 import START_KEY
from service.routes_v1 import router as v1_router
from service.routes_v2 import __version__
from service.routes_v2 import router as v2_router
from service.runtime_state import NotReady, RuntimeState
from service.settings import Settings, SettingsError, load_settings

log = logging.getLogger("conceptguard.service")


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once the request body passes the limit (FastAPI re-raises
    HTTP exceptions met while reading a body, so it reaches the handlers below)."""

    def __init__(self, limit: int, size: int | None = None):
        told = f"is {size} bytes" if size is not None else f"exceeds {limit} bytes"
        super().__init__(413, f"the request body {told}; the limit is {limit} bytes "
                              "(CONCEPTGUARD_MAX_UPLOAD_BYTES)")


class ServiceMiddleware:
    """Pure ASGI: request metrics by route template, latency start, streaming body limit."""

    def __init__(self, app: ASGIApp, body_limit: Callable[[], int | None]):
        self.app = app
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope[START_KEY] = start
        status = 500
        limit = self.body_limit()
        if limit is not None:
            receive = _limited(receive, scope, limit)

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics.observe_request(endpoint, status, time.perf_counter() - start)


def _limited(receive: Receive, scope: Scope, limit: int) -> Receive:
    declared = None
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = None
    seen = 0

    async def receive_limited() -> Message:
        nonlocal seen
        if declared is not None and declared > limit:
            raise BodyTooLarge(limit, declared)  # before reading a byte of it
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_limited


# ---------------------------------------------------------------- errors


def _is_v2(request: Request) -> bool:
    return request.url.path.startswith("/v2")


def error_response(request: Request, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if 400 <= status < 500:
        metrics.bad_request(code)
    body: dict[str, Any] = ({"error": message} if _is_v2(request)
                            else {"error": {"code": code, "message": message}})
    return JSONResponse(body, status_code=status, headers=headers)


def _retry_after(request: Request) -> dict[str, str]:
    settings: Settings | None = getattr(request.app.state, "settings", None)
    return {"Retry-After": str(settings.retry_after_s if settings else 1)}


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
               422: "invalid_request"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ImageError)
    async def _image(request: Request, exc: ImageError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, str(exc))

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, str(exc), exc.headers)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(request, 503, "queue_full", str(exc), _retry_after(request))

    @app.exception_handler(NotReady)
    async def _not_ready(request: Request, exc: NotReady) -> JSONResponse:
        return error_response(request, 503, "not_ready", str(exc), _retry_after(request))

    @app.exception_handler(BatcherClosed)
    async def _closed(request: Request, exc: BatcherClosed) -> JSONResponse:
        return error_response(request, 503, "shutting_down", str(exc), _retry_after(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(request, 400, "invalid_json",
                                  "the request body is not valid JSON")
        parts = []
        for e in errors[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{loc}: {e.get('msg')}")
        return error_response(request, 422, "invalid_request", "; ".join(parts))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(request, 500, "internal", f"internal error: {type(exc).__name__}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail),
                              dict(exc.headers) if exc.headers else None)


# ---------------------------------------------------------------- the app


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``settings`` default to the environment, read at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        single_threaded_blas()
        try:
            s = settings if settings is not None else load_settings()
        except SettingsError as exc:
            log.error("conceptguard: %s", exc)
            raise
        state = RuntimeState(s)
        try:
            await state.start()
        except BankError as exc:
            log.error("conceptguard: cannot serve bank %s: %s", s.bank, exc)
            raise
        dataplane = DataPlane(state, s)
        await dataplane.start()
        app.state.settings = s
        app.state.runtime_state = state
        app.state.dataplane = dataplane
        try:
            yield
        finally:
            state.stop()
            await dataplane.close()
            metrics.mark_process_dead()

    app = FastAPI(
        title="conceptguard",
        version=__version__,
        summary="Runtime monitor for image classifiers: a calibrated trust score and a "
                "reject decision per prediction, with the concepts behind it.",
        lifespan=lifespan,
    )

    def body_limit() -> int | None:
        s: Settings | None = getattr(app.state, "settings", None)
        return s.max_upload_bytes if s is not None else None

    app.add_middleware(ServiceMiddleware, body_limit=body_limit)
    install_error_handlers(app)
    app.include_router(v1_router)
    app.include_router(v2_router)
    app.include_router(report_router)

    @app.get("/metrics", tags=["metrics"], summary="Prometheus metrics (text format)",
             response_class=Response)
    def prometheus_metrics() -> Response:  # sync: runs in the thread pool
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


app = create_app()
