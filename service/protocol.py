"""HTTP/1.1 connection hygiene for uvicorn: header timeout, connection cap.

``conceptguard serve`` runs uvicorn with one of these protocol classes, chosen by
``CONCEPTGUARD_HTTP_PARSER``: ``GuardedHttpToolsProtocol`` (the default: uvicorn's
httptools parser, a C parser, less CPU per request) or ``GuardedH11Protocol`` (the pure-Python
h11 parser). Starting uvicorn by hand, pass ``--http service.protocol:GuardedHttpToolsProtocol``.
On top of uvicorn's protocol, both:

* a connection must deliver a complete request head within
  ``CONCEPTGUARD_HEADER_TIMEOUT_S`` of connecting or of its previous response (idle and
  Slowloris connections are closed; the keep-alive timeout still closes idle keep-alive
  connections sooner);
* at most ``CONCEPTGUARD_MAX_CONNECTIONS`` connections per worker: a new connection over
  the cap closes the longest-idle one (no request in flight), or itself when every
  connection is busy, so idle sockets cannot lock clients out;
* on SIGTERM, a connection whose request head is still arriving may finish that request
  (answered, then closed) instead of being cut;
* a request to a queued route arriving on a keep-alive connection while the worker is at
  capacity is held, reading paused, for at most ``CONCEPTGUARD_ADMISSION_HOLD_S``, instead
  of costing a 503 (:mod:`service.admission_hold`).

The body read timeout (``CONCEPTGUARD_BODY_TIMEOUT_S``) is enforced in the ASGI middleware.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.admission_hold import COUNTED_KEY, AdmissionGate, gate, is_queued_request
from service.settings import Settings, SettingsError, load_settings

_POLL_S = 0.05  # while requests are held, capacity freed elsewhere (gRPC) is noticed this often


@functools.lru_cache(maxsize=1)
def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError:
        return Settings.model_construct()  # the app's startup reports the bad setting


class _ConnectionGuard:
    """The guard, written once for both parsers (a mixin before uvicorn's protocol class:
    it uses the protocol's ``cycle``, ``connections``, ``transport``, ``loop``, ``logger``)."""

    cycle: Any
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    logger: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = _settings()
        self.header_timeout = float(s.header_timeout_s)
        self.max_connections = int(s.max_connections)
        self._header_timer: asyncio.TimerHandle | None = None
        self._draining = False
        self.last_active = time.monotonic()
        self.hold_s = float(s.admission_hold_s)
        self._gate: AdmissionGate = gate(int(s.queue_size))
        self._served = False  # a response was completed on this connection (keep-alive)
        self._held: bytes | None = None  # the bytes read of a held request
        self._hold_timer: asyncio.TimerHandle | None = None
        self._counted = False  # this connection's request counts in the gate's in_progress

    # a request is in flight from its head to the end of its response
    def busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def _make_room(self) -> None:
        idle = [c for c in self.connections
                if c is not self and isinstance(c, _ConnectionGuard) and not c.busy()
                and c._held is None]
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
        if not self.busy() and self._held is None and is_queued_request(data):
            if (self._served and self.hold_s > 0 and not self._draining
                    and self._gate.at_capacity()):
                self._hold(data)
                return
            self._count()
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        waiting = not self.busy()
        super().data_received(data)  # type: ignore[misc]
        if self.busy():
            self._cancel_header_timer()  # the head arrived; the body has its own timeout
            if waiting and self._counted:  # its task has not run yet: it will see the mark
                self.cycle.scope[COUNTED_KEY] = True
            if self._draining:
                self.cycle.keep_alive = False  # answer this request, then close
        elif waiting and self._header_timer is None:
            self._arm_header_timer()

    def on_response_complete(self) -> None:
        self.last_active = time.monotonic()
        self._served = True
        super().on_response_complete()  # type: ignore[misc]
        if not self.busy() and not self.transport.is_closing():
            self._arm_header_timer()
        self._uncount()

    # ------------------------------------------------ holding at capacity

    def _count(self) -> None:
        if not self._counted:
            self._counted = True
            self._gate.started()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self._gate.finished()  # may release a held connection

    def _hold(self, data: bytes) -> None:
        """Keep the bytes read, stop reading; the gate or the hold's end releases it."""
        self._held = data
        self.transport.pause_reading()
        self._cancel_header_timer()
        self._unset_keepalive_if_required()  # type: ignore[attr-defined]  # uvicorn's timer
        self._hold_timer = self.loop.call_later(self.hold_s, self._hold_expired)
        self._gate.hold(self)
        _poll_while_held(self.loop, self._gate)

    def _hold_expired(self) -> None:
        self._hold_timer = None
        if self._gate.forget(self):
            self.release_hold()  # on to the ordinary admission: a 503 if still full

    def release_hold(self) -> None:
        """Hand the held request to the parser (the gate calls this when a place frees)."""
        data, self._held = self._held, None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if data is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        self._count()
        self._parse(data)

    def _head_arriving(self) -> bool:
        """Part of a request head has arrived, and no whole head yet (parser-specific)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Graceful shutdown (SIGTERM): a connection whose request head is still arriving is
        let finish that request (answered, then closed) instead of being cut;
        idle connections close at once, busy ones after their response (uvicorn)."""
        if self._held is not None and not self.transport.is_closing():
            self._draining = True  # answered (served or 503 shutting down), then closed
            self._gate.forget(self)
            self.release_hold()
            return
        if not self.busy() and self._head_arriving() and not self.transport.is_closing():
            self._draining = True
            return
        super().shutdown()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._held is not None:
            self._gate.forget(self)
            self._held = None
            if self._hold_timer is not None:
                self._hold_timer.cancel()
                self._hold_timer = None
        super().connection_lost(exc)  # type: ignore[misc]
        self._uncount()


_polling: set[int] = set()


def _poll_while_held(loop: asyncio.AbstractEventLoop, g: AdmissionGate) -> None:
    """While connections are held, wake the gate every ``_POLL_S`` (capacity freed by a
    request that did not come through these connections, e.g. gRPC)."""
    if id(g) in _polling:
        return
    _polling.add(id(g))

    def tick() -> None:
        g.wake()
        if g.held:
            loop.call_later(_POLL_S, tick)
        else:
            _polling.discard(id(g))

    loop.call_later(_POLL_S, tick)


class GuardedH11Protocol(_ConnectionGuard, H11Protocol):
    def _head_arriving(self) -> bool:
        return bool(self.conn.trailing_data[0])


class GuardedHttpToolsProtocol(_ConnectionGuard, HttpToolsProtocol):
    _head_started = False

    def on_message_begin(self) -> None:
        self._head_started = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_started = False
        super().on_headers_complete()

    def _head_arriving(self) -> bool:
        return self._head_started


PROTOCOLS = {"httptools": "service.protocol:GuardedHttpToolsProtocol",
             "h11": "service.protocol:GuardedH11Protocol"}
