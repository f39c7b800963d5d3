"""The FastAPI application: lifespan (settings, bank, runtime, batcher), the routers, the
middleware (:mod:`service.middleware`, which also serves the hot routes of the v1 and v2
route modules) and one error handler.

``uvicorn service.app:app`` serves the bank named by ``CONCEPTGUARD_BANK``. Importing this
module needs no bank: settings are read and the bank is loaded at startup (lifespan), and a
bad setting or bank stops the startup with a message naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from conceptguard.bank import BankError, check_bank_quickly
from conceptguard.threads import single_threaded_blas
from service import __version__, metrics_export
from service.admission_hold import gate as admission_gate
from service.dataplane import DataPlane
from service.docs_route import router as docs_router
from service.errors import ServiceError, as_service_error, error_response
from service.feedback import app_book
from service.lifecycle import SharedBank, bound_heap, drain_on_sigterm, raise_file_limit
from service.logs import ensure_log_handler
from service.middleware import ServiceMiddleware, lone_request
from service.oip import ModelStats
from service.openapi import with_limits
from service.report_route import router as report_router
from service.routes_admin import router as admin_router
from service.routes_feedback import router as feedback_router
from service.routes_sink import router as sink_router
from service.routes_v1 import HOT_ROUTES as V1_HOT_ROUTES
from service.routes_v1 import router as v1_router
from service.routes_v2 import HOT_ROUTES as V2_HOT_ROUTES
from service.routes_v2 import router as v2_router
from service.runtime_state import RuntimeState
from service.settings import Settings, SettingsError, load_settings
from service.shared_state import state_folder

log = logging.getLogger("conceptguard.service")


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
        # a lone request may skip the inference thread: the HTTP connections count the
        # requests in progress (service.protocol); one they did not count (gRPC) never does
        dataplane = DataPlane(state, s, alone=lone_request(admission_gate()))
        await dataplane.start()
        app.state.settings = s
        app.state.runtime_state = state
        app.state.dataplane = dataplane
        admission_gate().bind(dataplane.saturated, s.queue_size)  # service.protocol's holds
        app.state.v2_stats = ModelStats()
        # the feedback store (its key and its SQLite table, shared by the workers through
        # the state folder) is opened now, in a thread: not by a first request on the loop
        try:
            await anyio.to_thread.run_sync(app_book, app)
        except (OSError, sqlite3.Error) as exc:
            log.error("conceptguard: cannot open the feedback store in the state folder %s "
                      "(CONCEPTGUARD_STATE_DIR, else PROMETHEUS_MULTIPROC_DIR): %s",
                      state_folder(), exc)
            raise
        metrics_export.initialise(app)
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
            admission_gate().unbind()
            await dataplane.close()
            metrics_export.mark_process_dead()

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

    # one middleware layer; it answers the hot routes itself (service.middleware)
    app.add_middleware(ServiceMiddleware, hot=(*V1_HOT_ROUTES, *V2_HOT_ROUTES))
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
    app.include_router(admin_router)

    @app.get("/metrics", tags=["metrics"], summary="Prometheus metrics (text format)",
             response_class=Response)
    def prometheus_metrics() -> Response:  # sync: runs in the thread pool
        body, content_type = metrics_export.render()
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
        metrics_export.mark_process_dead()
        logging.shutdown()
        os._exit(3)


app = create_app()
