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
from conceptguard.threads import single_threaded_blas
from service import metrics
from service.dataplane import DataPlane
from service.docs_route import router as docs_router
from service.errors import (
    BodyTimeout,
    BodyTooLarge,
    ServiceError,
    as_service_error,
    error_response,
)
from service.jsonguard import json_problem
from service.lifecycle import SharedBank, bound_heap, drain_on_sigterm, raise_file_limit
from service.logs import ensure_log_handler
from service.openapi import with_limits
from service.report_route import router as report_router
from service.request_ids import RequestIdMiddleware
from service.routes_feedback import router as feedback_router
from service.routes_sink import router as sink_router
from service.routes_v1 import START_KEY
from service.routes_v1 import router as v1_router
from service.routes_v2 import __version__
from service.routes_v2 import router as v2_router
from service.runtime_state import RuntimeState
from service.settings import Settings, SettingsError, load_settings
from service.v2_tensors import ModelStats

log = logging.getLogger("conceptguard.service")


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
                await send_error(scope, send, ServiceError("the queue is full; retry later",
                                                           503, "queue_full"),
                                 s.retry_after_s)
                return None
        receive = _limited(receive, scope, s.max_upload_bytes, s.body_timeout_s)
        encoding = _content_encoding(scope)
        if scope.get("method") in ("POST", "PUT", "PATCH") and encoding is not None:
            await send_error(scope, send, ServiceError(
                f"Content-Encoding {encoding!r} is not supported (send the body uncompressed)",
                415, "unsupported_media_type"))
            return None
        if scope.get("method") in ("POST", "PUT", "PATCH") and _is_json(scope):
            try:
                body = await _read_all(receive)
            except ServiceError as exc:  # BodyTooLarge, BodyTimeout
                await send_error(scope, send, exc, s.retry_after_s)
                return None
            problem = json_problem(body, s.max_json_depth)
            if problem is not None:
                await send_error(scope, send, ServiceError(problem, 400, "invalid_json"))
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


def _content_encoding(scope: Scope) -> str | None:
    """The request's Content-Encoding when it is not the identity (no body is decoded, so
    a compressed one is refused before any parser reads it)."""
    for key, value in scope.get("headers", ()):
        if key == b"content-encoding":
            encoding = value.decode("latin-1").strip().lower()
            return None if encoding in ("", "identity") else encoding
    return None


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


async def send_error(scope: Scope, send: Send, err: ServiceError, retry_after_s: int = 1
                     ) -> None:
    """An error response sent straight from the middleware (v1 or v2 body format)."""
    response = error_response(scope.get("path", ""), err, retry_after_s)
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


def install_error_handlers(app: FastAPI) -> None:
    """One handler for every exception: :func:`service.errors.as_service_error`, then
    :func:`service.errors.error_response` (the v1 or v2 body, Retry-After on a 503)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        err = as_service_error(exc, request.headers.get("content-type", ""))
        if err.status >= 500 and not isinstance(exc, ServiceError):
            log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        settings: Settings | None = getattr(request.app.state, "settings", None)
        return error_response(request.url.path, err,
                              settings.retry_after_s if settings else 1)

    for kind in (ServiceError, StarletteHTTPException, RequestValidationError,
                 RecursionError, Exception):
        app.add_exception_handler(kind, handle)


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
        ensure_log_handler()
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
        docs_url=None,  # FastAPI's pages load their assets from a CDN: service.docs_route
        redoc_url=None,  # serves both with the assets on this server
    )

    def current_settings() -> Settings | None:
        return getattr(app.state, "settings", None)

    app.add_middleware(ServiceMiddleware, settings=current_settings)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries the id
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
    app.include_router(docs_router)
    app.include_router(feedback_router)
    app.include_router(sink_router)

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
