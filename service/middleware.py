"""The HTTP middleware, pure ASGI: every request's checks before any route runs.

Request metrics by route template; the latency start (:func:`latency_ms`); admission
before the body is read (a queued route gets 503 when the batcher has no room for one more
image, :meth:`service.batching.Batcher.has_room`); the streaming body limit and read
timeout; compressed bodies refused; and the JSON guard (:func:`service.codecs.json_problem`,
nesting depth and encoding) run once for every JSON body before any parser sees it, the
request marked so that a route reading the body itself does not run it again.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.codecs import json_problem
from service.errors import BodyTimeout, BodyTooLarge, ServiceError, error_response
from service.settings import Settings

if TYPE_CHECKING:
    from service.dataplane import DataPlane

START_KEY = "conceptguard.start"  # the request's start time (perf_counter), in its scope
JSON_CHECKED_KEY = "conceptguard.json_checked"  # True once the JSON guard passed the body


def latency_ms(scope: Scope) -> float:
    """Milliseconds since the middleware received the request (0 outside it)."""
    start = scope.get(START_KEY)
    return round((time.perf_counter() - start) * 1000.0, 3) if start else 0.0


# the routes whose work is queued: a request is refused with 503 before its body is read
# when the queue cannot take one more image
_QUEUED_ROUTES = re.compile(r"^/(v1/classify|v2/models/[^/]+(/versions/[^/]+)?/infer)/?$")


class ServiceMiddleware:
    """Pure ASGI: request metrics by route template, latency start, admission before the
    body is read, streaming body limit and read timeout, a JSON guard (nesting depth and
    encoding checked once for every JSON body, before any parser sees it)."""

    def __init__(self, app: ASGIApp):
        self.app = app

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
            # the app's settings, set by its lifespan (None before the startup)
            s: Settings | None = getattr(getattr(scope.get("app"), "state", None),
                                         "settings", None)
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
            scope[JSON_CHECKED_KEY] = True
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
