"""Request ids: every HTTP response carries ``x-request-id``.

A client-supplied ``x-request-id`` is kept when it is valid (1 to 128 characters of
``A-Z a-z 0-9 . _ : -``, starting with a letter or digit); otherwise the service makes one
(32 hex characters, random). The id is in the ASGI scope under :data:`SCOPE_KEY` for the
routes, which also put it in the response body (v1: ``request_id``; v2:
``parameters.request_id``) and in every receipt (see :mod:`service.feedback`).
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
SCOPE_KEY = "conceptguard.request_id"
VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def new_id() -> str:
    return uuid.uuid4().hex


def pick(supplied: str | None) -> str:
    """The client's id when valid, else a new one."""
    if supplied is not None and VALID.fullmatch(supplied):
        return supplied
    return new_id()


def of(scope: Scope) -> str:
    """The request id of a request (a new one outside the middleware, e.g. in unit tests)."""
    rid = scope.get(SCOPE_KEY)
    if not isinstance(rid, str):
        rid = scope[SCOPE_KEY] = new_id()
    return rid


class RequestIdMiddleware:
    """Pure ASGI: picks the request id and adds it to the response headers."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = None
        for key, value in scope.get("headers", ()):
            if key == HEADER:
                supplied = value.decode("latin-1")
                break
        rid = scope[SCOPE_KEY] = pick(supplied)
        header = (HEADER, rid.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != HEADER]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        await self.app(scope, receive, send_with_id)
