"""The HTTP middleware, pure ASGI, one layer: every request's preamble before any route
runs, and the hot endpoints served straight from here.

For every request: the request id (``x-request-id``: the client's when valid, else a new
one; in the scope under :data:`REQUEST_ID_KEY` and on every answer), the latency start
(:func:`latency_ms`), request metrics by route template (their children resolved once per
label pair), admission before the body is read (a queued route gets 503 when the batcher
has no room for one more image, :meth:`service.batching.Batcher.has_room`), the streaming
body limit and read timeout, compressed bodies refused, and the JSON guard
(:func:`service.codecs.json_problem`, nesting depth and encoding) run once for every JSON
body before any parser sees it, the request marked so that a route reading the body itself
does not run it again.

The hot endpoints (``POST /v1/classify``, ``POST /v2/models/{name}[/versions/{version}]/infer``)
are :class:`HotRoute` entries handed to the middleware by the app: a matching request is
answered by the route's plain ASGI handler, without the framework's routing, dependency
and validation layers (the same handlers also sit behind the framework's routes, which
give the OpenAPI document). An exception there is answered as the app's error handler
would (:func:`send_exception`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission_hold import COUNTED_KEY
from service.codecs import json_problem
from service.errors import (
    BodyTimeout,
    BodyTooLarge,
    ClientClosed,
    ServiceError,
    as_service_error,
    error_response,
)
from service.metrics import QUEUE_FULL, REQUEST_DURATION, REQUESTS
from service.settings import Settings

if TYPE_CHECKING:
    from service.admission_hold import AdmissionGate
    from service.dataplane import DataPlane

log = logging.getLogger("conceptguard.service")

START_KEY = "conceptguard.start"  # the request's start time (perf_counter), in its scope
JSON_CHECKED_KEY = "conceptguard.json_checked"  # True once the JSON guard passed the body
REQUEST_ID_KEY = "conceptguard.request_id"  # the request id, in its scope
REQUEST_ID_HEADER = b"x-request-id"
_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


# ---------------------------------------------------------------- request ids


def new_request_id() -> str:
    return uuid.uuid4().hex


def pick_request_id(supplied: str | None) -> str:
    """The client's id when valid (1 to 128 characters of ``A-Z a-z 0-9 . _ : -``, starting
    with a letter or digit), else a new one (32 hex characters, random)."""
    if supplied is not None and _VALID_ID.fullmatch(supplied):
        return supplied
    return new_request_id()


def request_id(scope: Scope) -> str:
    """The request id of a request (a new one outside the middleware, e.g. in unit tests)."""
    rid = scope.get(REQUEST_ID_KEY)
    if not isinstance(rid, str):
        rid = scope[REQUEST_ID_KEY] = new_request_id()
    return rid


def latency_ms(scope: Scope) -> float:
    """Milliseconds since the middleware received the request (0 outside it)."""
    start = scope.get(START_KEY)
    return round((time.perf_counter() - start) * 1000.0, 3) if start else 0.0


# ---------------------------------------------------------------- a lone request

# in a request's own context (each request task has its own): its connection counted it
_COUNTED: ContextVar[bool] = ContextVar("conceptguard_counted", default=False)


def mark_counted() -> None:
    """The running request was counted by its connection (this middleware calls it for a
    scope that carries :data:`service.admission_hold.COUNTED_KEY`; for that task only)."""
    _COUNTED.set(True)


def lone_request(gate: AdmissionGate) -> Callable[[], bool]:
    """The data plane's test for a lone request: the running request was counted by its
    connection (:mod:`service.protocol` marks its scope, this middleware its context) and
    ``gate`` counts no other request in progress on this worker's connections."""

    def alone() -> bool:
        return _COUNTED.get() and gate.in_progress == 1

    return alone


# ---------------------------------------------------------------- hot routes

# a hot route's handler: (scope, receive, send, path parameters) -> None, answering itself
HotHandler = Callable[[Scope, Receive, Send, dict[str, str]], Awaitable[None]]


@dataclass(frozen=True)
class HotRoute:
    """A POST endpoint served straight from the middleware: ``pattern`` matches the whole
    path (named groups: the path parameters), ``template`` is its metrics label."""

    pattern: re.Pattern[str]
    template: str
    handle: HotHandler


async def send_json(send: Send, body: bytes, status: int = 200,
                    headers: Sequence[tuple[bytes, bytes]] = (),
                    media_type: bytes = b"application/json") -> None:
    """A complete response in two ASGI messages (``body``: already encoded)."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media_type),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


# the routes whose work is queued: a request is refused with 503 before its body is read
# when the queue cannot take one more image
_QUEUED_ROUTES = re.compile(r"^/(v1/classify|v2/models/[^/]+(/versions/[^/]+)?/infer)/?$")
# the only route of the binary tensor data extension (Inference-Header-Content-Length)
_V2_INFER = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer/?$")
# routes whose body is always JSON: a body sent without a Content-Type is read as JSON (as
# /v1/classify and v2 infer read it), so it meets the same guard and the same messages
_JSON_ROUTES = re.compile(r"^/v1/(monitor|feedback|bank/reload|admin/operating-point)/?$")


class ServiceMiddleware:
    """Pure ASGI, the only middleware layer: request id, latency start, request metrics,
    admission, body limit and timeout, the JSON guard; then the hot route's handler or the
    app (see the module docstring)."""

    def __init__(self, app: ASGIApp, hot: Sequence[HotRoute] = ()):
        self.app = app
        self.hot = tuple(hot)
        # (endpoint, status) -> the request counter's and duration histogram's children
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope[START_KEY] = start
        if scope.get(COUNTED_KEY):  # counted by its connection: may be alone (data plane)
            mark_counted()
        head = _read_headers(scope)
        supplied = head.get(REQUEST_ID_HEADER)
        rid = scope[REQUEST_ID_KEY] = pick_request_id(
            None if supplied is None else supplied.decode("latin-1"))
        id_header = (REQUEST_ID_HEADER, rid.encode("ascii"))
        status = 0  # 0 until the response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", ())
                           if h[0].lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, id_header]}
            await send(message)

        route, params = self._match(scope)
        try:
            # the app's settings, set by its lifespan (None before the startup)
            s: Settings | None = getattr(getattr(scope.get("app"), "state", None),
                                         "settings", None)
            if s is not None:
                receive = await self._guard(scope, receive, send_with_id, s, head)
            if receive is None:
                return
            if route is None:
                await self.app(scope, receive, send_with_id)
                return
            try:
                await route.handle(scope, receive, send_with_id, params)
            except Exception as exc:
                if status:  # the answer has begun: nothing else can be sent
                    raise
                await send_exception(scope, send_with_id, exc, s)
        finally:
            endpoint = (route.template if route is not None else
                        getattr(scope.get("route"), "path", None) or _endpoint_guess(scope)
                        or "unmatched")
            self._observe(endpoint, status or 500, time.perf_counter() - start)

    def _match(self, scope: Scope) -> tuple[HotRoute | None, dict[str, str]]:
        if scope.get("method") != "POST":
            return None, {}
        path = route_path(scope)
        for route in self.hot:
            m = route.pattern.fullmatch(path)
            if m is not None:
                return route, m.groupdict()
        return None, {}

    def _observe(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        children = self._children.get(key)
        if children is None:  # label lookups once per (endpoint, status), not per request
            children = self._children[key] = (REQUESTS.labels(endpoint, str(status)),
                                              REQUEST_DURATION.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)

    async def _guard(self, scope: Scope, receive: Receive, send: Send, s: Settings,
                     head: dict[bytes, bytes]) -> Receive | None:
        """Checks before the app runs; None when an error response was already sent."""
        method = scope.get("method")
        if method == "POST" and _QUEUED_ROUTES.match(route_path(scope)):
            app_state = getattr(scope.get("app"), "state", None)
            dp: DataPlane | None = getattr(app_state, "dataplane", None)
            if dp is not None and dp.saturated():
                QUEUE_FULL.inc()
                await send_error(scope, send, ServiceError("the queue is full; retry later",
                                                           503, "queue_full"),
                                 s.retry_after_s)
                return None
        receive = _limited(receive, head.get(b"content-length"), s.max_upload_bytes,
                           s.body_timeout_s)
        if method not in ("POST", "PUT", "PATCH"):
            return receive
        if b"content-type" not in head and _JSON_ROUTES.match(route_path(scope)):
            head[b"content-type"] = b"application/json"
            scope["headers"] = [*scope.get("headers", ()), (b"content-type", head[b"content-type"])]
        encoding = _content_encoding(head.get(b"content-encoding"))
        if encoding is not None:
            await send_error(scope, send, ServiceError(
                f"Content-Encoding {encoding!r} is not supported (send the body uncompressed)",
                415, "unsupported_media_type"))
            return None
        v2_infer = _V2_INFER.match(route_path(scope)) is not None
        if v2_infer or _is_json(head.get(b"content-type")):  # a v2 body starts with JSON
            try:  # whatever its content type says (octet-stream: the binary extension)
                body = await _read_all(receive)
            except ServiceError as exc:  # BodyTooLarge, BodyTimeout
                await send_error(scope, send, exc, s.retry_after_s)
                return None
            declared = (head.get(HEADER_LENGTH_RAW) if v2_infer
                        else None)  # the binary extension exists on v2 infer only
            checked = _json_part(body, declared)
            if checked is not None:
                problem = json_problem(checked, s.max_json_depth)
                if problem is not None:
                    await send_error(scope, send, ServiceError(problem, 400, "invalid_json"))
                    return None
                scope[JSON_CHECKED_KEY] = True
            return _replay(body, receive)
        return receive


# the binary tensor data extension's header: the body's first L bytes are its JSON
HEADER_LENGTH_RAW = b"inference-header-content-length"
# the request headers the middleware reads, found in one pass (the first of each)
_WANTED = frozenset({b"content-length", b"content-type", b"content-encoding",
                     REQUEST_ID_HEADER, HEADER_LENGTH_RAW})


def _json_part(body: bytes, declared: bytes | None) -> bytes | None:
    """The JSON the guard checks: the whole body or, with the binary tensor data
    extension's ``Inference-Header-Content-Length: L`` (a JSON content type is allowed
    there), its first L bytes; the binary data after them is not JSON. None when L is not
    a byte count within the body: the v2 parser then refuses the request, naming it."""
    if declared is None:
        return body
    try:
        n = int(declared)
    except ValueError:
        return None
    return body[:n] if 0 <= n <= len(body) else None


def _read_headers(scope: Scope) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in scope.get("headers", ()):
        if key in _WANTED and key not in out:
            out[key] = value
    return out


def route_path(scope: Scope) -> str:
    """The path the routes see: without the ``root_path`` the server was mounted under (as
    the framework's router matches it)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _endpoint_guess(scope: Scope) -> str | None:
    """The route template for a request answered before routing (admission, JSON guard)."""
    path = route_path(scope)
    if path.rstrip("/") == "/v1/classify":
        return "/v1/classify"
    if _QUEUED_ROUTES.match(path):
        return ("/v2/models/{name}/versions/{version}/infer" if "/versions/" in path
                else "/v2/models/{name}/infer")
    known = {"/v1/monitor", "/v1/bank/reload"}
    return path if path in known else None


def _content_encoding(value: bytes | None) -> str | None:
    """The request's Content-Encoding when it is not the identity (no body is decoded, so
    a compressed one is refused before any parser reads it)."""
    if value is None:
        return None
    encoding = value.decode("latin-1").strip().lower()
    return None if encoding in ("", "identity") else encoding


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    ctype = content_type.split(b";")[0].strip().lower()
    return ctype == b"application/json" or ctype.endswith(b"+json")


async def read_body(receive: Receive) -> bytes:
    """The whole request body (what the guard's receive lets through)."""
    return await _read_all(receive)


async def _read_all(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # before the body was complete
            raise ClientClosed()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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


async def send_exception(scope: Scope, send: Send, exc: Exception,
                         settings: Settings | None) -> None:
    """What the app's error handler answers for ``exc`` (:func:`service.errors.as_service_error`;
    an unexpected exception is logged and answered 500)."""
    ctype = _read_headers(scope).get(b"content-type", b"").decode("latin-1")
    err = as_service_error(exc, ctype)
    if err.status >= 500 and not isinstance(exc, ServiceError):
        log.exception("unhandled error on %s", scope.get("path", ""), exc_info=exc)
    await send_error(scope, send, err, settings.retry_after_s if settings else 1)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _limited(receive: Receive, content_length: bytes | None, limit: int, timeout_s: float
             ) -> Receive:
    declared = None
    if content_length is not None:
        try:
            declared = int(content_length)
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
