"""HTTP/1.1 connection hygiene for uvicorn: header timeout, connection cap.

``conceptguard serve`` runs uvicorn with this protocol class (``--http
service.protocol:GuardedH11Protocol`` when starting uvicorn by hand). On top of uvicorn's
h11 protocol:

* a connection must deliver a complete request head within
  ``CONCEPTGUARD_HEADER_TIMEOUT_S`` of connecting or of its previous response (idle and
  Slowloris connections are closed; the keep-alive timeout still closes idle keep-alive
  connections sooner);
* at most ``CONCEPTGUARD_MAX_CONNECTIONS`` connections per worker: a new connection over
  the cap closes the longest-idle one (no request in flight), or itself when every
  connection is busy, so idle sockets cannot lock clients out.

The body read timeout (``CONCEPTGUARD_BODY_TIMEOUT_S``) is enforced in the ASGI middleware.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings, SettingsError, load_settings


@functools.lru_cache(maxsize=1)
def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError:
        return Settings.model_construct()  # the app's startup reports the bad setting


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = _settings()
        self.header_timeout = float(s.header_timeout_s)
        self.max_connections = int(s.max_connections)
        self._header_timer: asyncio.TimerHandle | None = None
        self.last_active = time.monotonic()

    # a request is in flight from its head to the end of its response
    def busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def _make_room(self) -> None:
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and not c.busy()]
        if idle:
            victim = min(idle, key=lambda c: c.last_active)
            victim._close("connection cap reached")
        else:
            self._close("connection cap reached")

    def _close(self, why: str) -> None:
        if not self.transport.is_closing():
            self.logger.debug("closing connection: %s", why)
            self.transport.close()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if not self.busy():
            self._close("no complete request head in time")

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        waiting = not self.busy()
        super().data_received(data)
        if self.busy():
            self._cancel_header_timer()  # the head arrived; the body has its own timeout
        elif waiting and self._header_timer is None:
            self._arm_header_timer()

    def on_response_complete(self) -> None:
        self.last_active = time.monotonic()
        super().on_response_complete()
        if not self.busy() and not self.transport.is_closing():
            self._arm_header_timer()

    def shutdown(self) -> None:
        """Graceful shutdown (SIGTERM): a connection whose request head is still arriving is
        let finish that request (answered with ``Connection: close``) instead of being cut;
        idle connections close at once, busy ones after their response (uvicorn)."""
        partial = not self.busy() and bool(self.conn.trailing_data[0])
        if partial and not self.transport.is_closing():
            self._draining = True
            return
        super().shutdown()

    def handle_events(self) -> None:
        super().handle_events()
        if getattr(self, "_draining", False) and self.busy():
            self.cycle.keep_alive = False  # answer this request, then close

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)
