"""The FastAPI application: lifespan (settings, bank, runtime, batcher), middleware, errors.

``uvicorn service.app:app`` serves the bank named by ``CONCEPTGUARD_BANK``. Importing this
module needs no bank: settings are read and the bank is loaded at startup (lifespan), and a
bad setting or bank stops the startup with a message naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conceptguard.bank import BankError, check_bank_quickly
from conceptguard.imaging import ImageError
from conceptguard.threads import single_threaded_blas
from service import metrics
from service.batching import BatcherClosed, QueueFull
from service.dataplane import DataPlane, ServiceError
from service.jsonguard import json_problem
from service.lifecycle import SharedBank, bound_heap, drain_on_sigterm, raise_file_limit
from service.openapi import with_limits
from service.report_route import router as report_router
from service.routes_v1 import START_KEY
from service.routes_v1 import router as v1_router
from service.routes_v2 import __version__
from service.routes_v2 import router as v2_router
from service.runtime_state import NotReady, RuntimeState
from service.settings import Settings, SettingsError, load_settings
from service.v2_tensors import ModelStats

log = logging.getLogger("conceptguard.service")


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once the request body passes the limit (FastAPI re-raises
    HTTP exceptions met while reading a body, so it reaches the handlers below)."""

    def __init__(self, limit: int, size: int | None = None):
        told = f"is {size} bytes" if size is not None else f"exceeds {limit} bytes"
        super().__init__(413, f"the request body {told}; the limit is {limit} bytes "
                              "(CONCEPTGUARD_MAX_UPLOAD_BYTES)")


class BodyTimeout(StarletteHTTPException):
    """The client stalled while sending the body (Slowloris on the body)."""

    def __init__(self, seconds: float):
        super().__init__(408, f"no request body data for {seconds:g} s "
                              "(CONCEPTGUARD_BODY_TIMEOUT_S)", headers={"Connection": "close"})


# the routes whose work is queued: a request is refused with 503 before its body is read
# when the queue cannot take one more image
_QUEUED_ROUTES = re.compile(r"^/(v1/classify|v2/models/[^/]+(/versions/[^/]+)?/infer)/?$")


class ServiceMiddleware:
    """Pure ASGI: request metrics by route template, latency start, admission before the
    body is read, streaming body limit and read timeout, a JSON guard (nesting depth and
    encoding checked once for every JSON body, before any parser sees it)."""

    def __init__(self, app: ASGIApp, settings: Callable[[], Settings | None]):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope[START_KEY] = start
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            s = self.settings()
            if s is not None:
                receive = await self._guard(scope, receive, send_status, s)
            if receive is not None:
                await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or _endpoint_guess(scope) or "unmatched"
            metrics.observe_request(endpoint, status, time.perf_counter() - start)

    async def _guard(self, scope: Scope, receive: Receive, send: Send, s: Settings
                     ) -> Receive | None:
        """Checks before the app runs; None when an error response was already sent."""
        path = scope.get("path", "")
        if scope.get("method") == "POST" and _QUEUED_ROUTES.match(path):
            app_state = getattr(scope.get("app"), "state", None)
            dp: DataPlane | None = getattr(app_state, "dataplane", None)
            if dp is not None and dp.saturated():
                metrics.QUEUE_FULL.inc()
                await send_error(scope, send, 503, "queue_full",
                                 "the queue is full; retry later",
                                 {"Retry-After": str(s.retry_after_s)})
                return None
        receive = _limited(receive, scope, s.max_upload_bytes, s.body_timeout_s)
        if scope.get("method") in ("POST", "PUT", "PATCH") and _is_json(scope):
            try:
                body = await _read_all(receive)
            except StarletteHTTPException as exc:
                code = "too_large" if exc.status_code == 413 else "timeout"
                await send_error(scope, send, exc.status_code, code, str(exc.detail),
                                 dict(exc.headers or {}))
                return None
            problem = json_problem(body, s.max_json_depth)
            if problem is not None:
                await send_error(scope, send, 400, "invalid_json", problem)
                return None
            return _replay(body, receive)
        return receive


def _endpoint_guess(scope: Scope) -> str | None:
    """The route template for a request answered before routing (admission, JSON guard)."""
    path = scope.get("path", "")
    if path.rstrip("/") == "/v1/classify":
        return "/v1/classify"
    if _QUEUED_ROUTES.match(path):
        return ("/v2/models/{name}/versions/{version}/infer" if "/versions/" in path
                else "/v2/models/{name}/infer")
    known = {"/v1/monitor", "/v1/bank/reload"}
    return path if path in known else None


def _is_json(scope: Scope) -> bool:
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            ctype = value.split(b";")[0].strip().lower()
            return ctype == b"application/json" or ctype.endswith(b"+json")
    return False


async def _read_all(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect

    return replay


async def send_error(scope: Scope, send: Send, status: int, code: str, message: str,
                     headers: dict[str, str] | None = None) -> None:
    """An error response sent straight from the middleware (v1 or v2 body format)."""
    if 400 <= status < 500:
        metrics.bad_request(code)
    path = scope.get("path", "")
    body: dict[str, Any] = ({"error": message} if path.startswith("/v2")
                            else {"error": {"code": code, "message": message}})
    response = JSONResponse(body, status_code=status, headers=headers)
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _limited(receive: Receive, scope: Scope, limit: int, timeout_s: float) -> Receive:
    declared = None
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = None
    seen = 0
    done = False

    async def receive_limited() -> Message:
        nonlocal seen, done
        if declared is not None and declared > limit:
            raise BodyTooLarge(limit, declared)  # before reading a byte of it
        if done:  # the body is complete: waiting for the disconnect needs no timeout
            return await receive()
        try:
            async with asyncio.timeout(timeout_s):
                message = await receive()
        except TimeoutError:
            raise BodyTimeout(timeout_s) from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
            done = not message.get("more_body", False)
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
               405: "method_not_allowed", 408: "timeout", 413: "too_large",
               415: "unsupported_media_type", 422: "invalid_request"}


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
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype != "application/json" and not ctype.endswith("+json"):
            return error_response(request, 415, "unsupported_media_type",
                                  f"unsupported content type {ctype!r}: send "
                                  "application/json")
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

    @app.exception_handler(RecursionError)
    async def _deep(request: Request, exc: RecursionError) -> JSONResponse:
        return error_response(request, 400, "invalid_json", "the request JSON is nested too "
                              "deeply (CONCEPTGUARD_MAX_JSON_DEPTH)")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            code = "invalid_json"  # FastAPI's own JSON parse failure
        return error_response(request, exc.status_code, code, str(exc.detail),
                              dict(exc.headers) if exc.headers else None)


# ---------------------------------------------------------------- the app


async def start_grpc(s: Settings, state: RuntimeState, dataplane: DataPlane,
                     stats: ModelStats) -> Any:
    """The Open Inference Protocol gRPC server on the same data plane (None if disabled)."""
    if s.grpc_port == 0:
        return None
    from service.grpc_server import GrpcServer

    server = GrpcServer(s, state, dataplane, stats, __version__)
    try:
        await server.start()
    except RuntimeError as exc:
        log.error("conceptguard: %s", exc)
        state.stop()
        await dataplane.close()
        raise
    return server


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``settings`` default to the environment, read at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        single_threaded_blas()
        bound_heap()
        try:
            s = settings if settings is not None else load_settings()
        except SettingsError as exc:
            log.error("conceptguard: %s", exc)
            raise
        raise_file_limit()
        state = RuntimeState(s)
        try:  # the cheap checks stop the startup at once with the reason
            await anyio.to_thread.run_sync(check_bank_quickly, state.path)
        except BankError as exc:
            log.error("conceptguard: cannot serve bank %s: %s", s.bank, exc)
            raise
        dataplane = DataPlane(state, s)
        await dataplane.start()
        app.state.settings = s
        app.state.runtime_state = state
        app.state.dataplane = dataplane
        app.state.v2_stats = ModelStats()
        metrics.initialise(app)
        grpc_server = await start_grpc(s, state, dataplane, app.state.v2_stats)
        shared = SharedBank.from_env(s)
        if shared is not None:
            shared.register()
        app.state.shared_bank = shared
        drain_on_sigterm(s.drain_timeout_s)
        # listen at once: live now, ready once the bank is loaded and every route warmed
        loader = asyncio.create_task(_load_and_warm(state, dataplane, shared),
                                     name="conceptguard-load")
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loader
            if shared is not None:
                await shared.close()
            if grpc_server is not None:
                await grpc_server.stop()
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

    def current_settings() -> Settings | None:
        return getattr(app.state, "settings", None)

    app.add_middleware(ServiceMiddleware, settings=current_settings)
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        state: RuntimeState | None = getattr(app.state, "runtime_state", None)
        return with_limits(base_openapi(), current_settings(),
                           state.current if state is not None else None)

    app.openapi = openapi  # type: ignore[method-assign]
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


async def _load_and_warm(state: RuntimeState, dataplane: DataPlane,
                         shared: SharedBank | None) -> None:
    """Load the bank, warm every route, then report ready; a bank that fails to load ends
    the worker (exit status 3, as a failed startup) with the reason in the log."""
    try:
        if shared is not None:
            await shared.adopt_startup(state)
        loaded = await state.start()
        await anyio.to_thread.run_sync(dataplane.warm_up, loaded)
        state.warmed = True
        log.info("ready: bank %s loaded and warmed", loaded.bank_id)
        if shared is not None:
            shared.start_following(state)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("conceptguard: cannot serve bank %s: %s", state.path, exc)
        metrics.mark_process_dead()
        logging.shutdown()
        os._exit(3)


app = create_app()
