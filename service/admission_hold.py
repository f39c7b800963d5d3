"""Holding saturated keep-alive connections instead of answering 503 (one per worker).

A client that ignores ``Retry-After`` and re-sends at once turns every 503 into another
request to parse, route and answer: under such a client the server spends its CPU on
refusals. So a request to a queued route (``/v1/classify``, ``/v2/.../infer``) that arrives
on a keep-alive connection (one that has already had an answer) while the worker is at
capacity is *held*: the connection protocol (:mod:`service.protocol`) keeps the bytes it
has read, stops reading the socket (``transport.pause_reading()``: the rest of the request
waits in the kernel, costing nothing), and hands the request to the parser when a place
frees, oldest first. A held request waits at most ``CONCEPTGUARD_ADMISSION_HOLD_S``; then it
goes on and meets the ordinary admission (503 + ``Retry-After`` when the queue is still
full), so latency and memory stay bounded (one read chunk per held connection, and the
connections are capped by ``CONCEPTGUARD_MAX_CONNECTIONS``).

"At capacity" is: queued-route requests in progress on this worker's connections (from the
hand-over of their bytes to the end of their response) reach ``CONCEPTGUARD_QUEUE_SIZE``,
or the batcher has no room for one more image (the function the app binds at startup:
:meth:`service.dataplane.DataPlane.saturated`).

A request on a fresh connection is never held: it is admitted or refused at once, as
before (a new client learns about the overload from the 503 and its ``Retry-After``).

The same count tells the data plane when a request is alone: the protocol marks the scope
of each request it counted (:data:`COUNTED_KEY`), and the middleware
(:func:`service.middleware.lone_request`) takes a request so marked for alone when the
count is 1. A request the connections did not count (gRPC, one pipelined behind another on
its connection, one whose first bytes did not show its route) is never alone.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

COUNTED_KEY = "conceptguard.counted"  # in a request's scope: its connection counted it

# the request line of a queued route, as it starts a connection's next request
_QUEUED_REQUEST_LINE = re.compile(
    rb"POST /(v1/classify|v2/models/[^/ ?]+(/versions/[^/ ?]+)?/infer)/?[ ?]")


def is_queued_request(data: bytes) -> bool:
    """True when ``data`` (the first bytes of a request) starts a POST to a queued route."""
    return _QUEUED_REQUEST_LINE.match(data) is not None


class Holdable(Protocol):
    """A connection the gate can release (the protocol mixin in :mod:`service.protocol`)."""

    def release_hold(self) -> None: ...


class AdmissionGate:
    """The worker's count of queued-route requests in progress and its line of held
    connections, oldest first. Pure bookkeeping: the protocol pauses and resumes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_progress = 0
        self._saturated: Callable[[], bool] = lambda: False
        self._held: OrderedDict[int, Holdable] = OrderedDict()

    def bind(self, saturated: Callable[[], bool], capacity: int) -> None:
        """The app's startup: its batcher's room test and its queue size."""
        self._saturated = saturated
        self.capacity = capacity

    def unbind(self) -> None:
        self._saturated = lambda: False

    def at_capacity(self) -> bool:
        return self.in_progress >= self.capacity or self._saturated()

    @property
    def held(self) -> int:
        return len(self._held)

    def hold(self, conn: Holdable) -> None:
        self._held[id(conn)] = conn

    def forget(self, conn: Holdable) -> bool:
        """Take ``conn`` out of the line (its hold timed out, it closed); True if it was in."""
        return self._held.pop(id(conn), None) is not None

    def started(self) -> None:
        self.in_progress += 1

    def finished(self) -> None:
        self.in_progress = max(0, self.in_progress - 1)
        self.wake()

    def wake(self) -> None:
        """Release held connections, oldest first, while there is capacity (each released
        request counts as in progress at once, so one free place releases one request)."""
        while self._held and not self.at_capacity():
            _, conn = self._held.popitem(last=False)
            conn.release_hold()


_gate: AdmissionGate | None = None


def gate(capacity: int = 512) -> AdmissionGate:
    """This worker's gate (made on first use with ``capacity``; the app's startup binds it)."""
    global _gate
    if _gate is None:
        _gate = AdmissionGate(capacity)
    return _gate

