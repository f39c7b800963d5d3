"""Dynamic micro-batching: a bounded queue of items and one future per item.

Requests submit their items (images); a single loop task takes up to ``max_batch_size``
queued items, waiting at most ``max_wait_s`` after the oldest one arrived, runs the batch
function once in a worker thread and hands each item its own result. A result that is an
exception instance fails its own item only (e.g. an image that does not decode); an
exception raised by the batch function is set on every future of that batch. The queue
is bounded: when admitting a request's items would exceed ``queue_size`` pending items,
:class:`QueueFull` is raised at once. With ``max_batch_size == 1`` there is no queue and no
loop: each request's items run straight through (one call per item), still bounded by
``queue_size``.

Adaptive (``adaptive=True``, the service's default): the wait for a batch to fill is cut
short as soon as no other item is on its way, i.e. every admitted item is already queued
(no request holds places from :meth:`Batcher.reserve` while it reads or decodes its images).
A lone request is dispatched at once instead of after ``max_wait_s``; concurrent requests
still merge (their places are reserved before they are queued), and while a batch runs the next one
fills, so under load batches grow as before. ``max_wait_s`` stays the upper bound.

Inline (``inline_below_s > 0`` with adaptive batching): a request's single item that is alone
runs on the event loop's own thread, skipping the hand-off to the worker thread and back
(two thread wake-ups, a future and a loop pass: on a small model a large share of a lone
request's CPU). Alone means: nothing else admitted or queued here (``pending`` is this
item), and ``alone()``, the caller's word that no other request is in progress anywhere in
the worker (the service asks its HTTP connections' count,
:func:`service.middleware.lone_request`; without that word, never). And only for an item
``inline_ok`` accepts (the service: one whose cost its input size bounds) while one-item
batches take at most ``inline_below_s`` (their recent time, rising at once on a slow one
and falling back slowly), so the loop is never blocked for long: whatever arrives
meanwhile (another request, a health probe) waits at most about that long to be read.

"Pending" counts items admitted and not yet answered (waiting or in the running batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import anyio.to_thread

from service.errors import BatcherClosed, QueueFull

__all__ = ["BatchFunction", "BatchObserver", "Batcher", "BatcherClosed", "QueueFull", "Ticket"]

T = TypeVar("T")
R = TypeVar("R")

# one result per item, in order: a value, or an exception instance that fails that item alone
BatchFunction = Callable[[list[T]], Sequence[R | BaseException]]
ThreadRunner = Callable[..., Awaitable[Any]]

# how fast the recent time of one-item batches falls back after a slow one (per batch)
LONE_DECAY = 0.2


def _never() -> bool:
    return False


def _any(_item: object) -> bool:
    return True


class BatchObserver(Protocol):
    """Hooks for metrics, kept off the request path: ``batch`` is given each batch run as
    ``(size, waits_s)`` (the service's is a queue's own ``append``, a builtin; the batches
    are observed later, off the path); ``watch`` is given the pending count once, to read
    when the metrics are written; ``queue_full`` is called for each refusal. None may
    raise."""

    batch: Callable[[tuple[int, Sequence[float]]], None]

    def watch(self, pending: Callable[[], int]) -> None: ...

    def queue_full(self) -> None: ...


class NullObserver:
    def batch(self, record: tuple[int, Sequence[float]]) -> None:
        pass

    def watch(self, pending: Callable[[], int]) -> None:
        pass

    def queue_full(self) -> None:
        pass


@dataclass(slots=True)
class Ticket:
    """Queue places taken by :meth:`Batcher.reserve`."""

    places: int
    used: bool = False


@dataclass(slots=True)
class _Item(Generic[T, R]):
    value: T
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.monotonic)


class Batcher(Generic[T, R]):
    """Merge concurrent submissions into batches for ``fn`` (run in a worker thread, or
    inline for a lone item: see the module docstring)."""

    def __init__(self, fn: BatchFunction[T, R], *, max_batch_size: int, max_wait_s: float,
                 queue_size: int, observer: BatchObserver | None = None,
                 run_sync: ThreadRunner | None = None, adaptive: bool = False,
                 alone: Callable[[], bool] | None = None, inline_below_s: float = 0.0,
                 inline_ok: Callable[[T], bool] | None = None):
        if max_batch_size < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1, max_wait_s >= 0")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.adaptive = adaptive
        self.alone = alone or _never
        self.inline_ok = inline_ok or _any
        self.inline_below_s = inline_below_s
        self._lone_s: float | None = None  # recent time of a one-item batch (None: none yet)
        self.observer: BatchObserver = observer or NullObserver()
        self._record_batch = self.observer.batch
        self.observer.watch(lambda: self._pending)
        self._run_sync: ThreadRunner = run_sync or anyio.to_thread.run_sync
        self._queue: deque[_Item[T, R]] = deque()
        self._pending = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    @property
    def pending(self) -> int:
        return self._pending

    async def start(self) -> None:
        """Start the loop task (a no-op without batching). Call inside the event loop."""
        self._closed = False
        if self.batching and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="conceptguard-batcher")

    async def close(self) -> None:
        """Stop the loop; items still queued fail with :class:`BatcherClosed`."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherClosed("the service is shutting down"))
        self._pending = 0

    @contextlib.contextmanager
    def reserve(self, n: int) -> Iterator[Ticket]:
        """Take ``n`` queue places now (or raise :class:`QueueFull` / :class:`BatcherClosed`)
        for items that are still being prepared; hand the ticket to :meth:`submit`. Places
        not passed on to :meth:`submit` are given back on exit."""
        self._admit(n)
        ticket = Ticket(n)
        try:
            yield ticket
        finally:
            if not ticket.used:
                self._pending -= ticket.places
                self._arrived.set()  # an adaptive batch may have been waiting for these

    def has_room(self, n: int) -> bool:
        """True when ``n`` more items fit in the queue now: the one capacity rule, used by
        :meth:`reserve` / :meth:`submit` and by the service's admission before a body is
        read (``n = 1``)."""
        return self._pending + n <= self.queue_size

    def _admit(self, n: int) -> None:
        if self._closed:
            raise BatcherClosed("the service is shutting down")
        if not self.has_room(n):
            self.observer.queue_full()
            raise QueueFull(self._pending, n, self.queue_size)
        self._pending += n

    async def submit(self, values: Sequence[T], ticket: Ticket | None = None) -> list[R]:
        """Run ``values`` (one request's items) and return their results in order."""
        n = len(values)
        if ticket is not None:
            if ticket.used or ticket.places != n:
                raise ValueError("a ticket covers one submit of exactly its item count")
            ticket.used = True
            if self._closed:
                self._pending -= n
                raise BatcherClosed("the service is shutting down")
        if n == 0:
            return []
        if ticket is None:
            self._admit(n)
        if not self.batching:
            return await self._straight_through(values)
        if n == 1 and self._inline() and self.inline_ok(values[0]):
            return [self._run_inline(values[0])]
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [_Item(v, loop.create_future(), now) for v in values]
        self._queue.extend(items)
        self._arrived.set()
        if self._task is None:  # not started: run the loop lazily in this event loop
            await self.start()
        if n == 1:  # one item (most requests): its future, without a gathering future
            return [await items[0].future]
        outcomes = await asyncio.gather(*(i.future for i in items), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes  # type: ignore[return-value]

    async def _straight_through(self, values: Sequence[T]) -> list[R]:
        results: list[R] = []
        try:
            for value in values:
                (result,) = await self._run_sync(self._call, [value], [0.0])
                if isinstance(result, BaseException):
                    raise result
                results.append(result)
        finally:
            self._pending -= len(values)
        return results

    def _inline(self) -> bool:
        """True when a lone item may run on the event loop (see the module docstring)."""
        lone = self._lone_s
        return (self.adaptive and lone is not None and lone <= self.inline_below_s
                and self._pending == 1 and not self._queue and self.alone())

    def _run_inline(self, value: T) -> R:
        try:
            (result,) = self._call([value], (0.0,))
        finally:
            self._pending -= 1
        if isinstance(result, BaseException):
            raise result
        return result

    def _note_lone(self, seconds: float) -> None:
        lone = self._lone_s
        self._lone_s = (seconds if lone is None or seconds > lone
                        else lone + LONE_DECAY * (seconds - lone))

    def _call(self, values: list[T], waits: Sequence[float]) -> Sequence[R | BaseException]:
        self._record_batch((len(values), waits))
        start = time.perf_counter()
        results = self.fn(values)
        if len(values) == 1:
            self._note_lone(time.perf_counter() - start)
        if len(results) != len(values):
            raise RuntimeError(f"batch function returned {len(results)} results for "
                               f"{len(values)} items")
        return results

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._fill()
            batch = self._take()
            if batch:
                await self._execute(batch)

    async def _fill(self) -> None:
        """Wait until the batch is full or the oldest item has waited ``max_wait_s``; when
        adaptive, only while admitted items are still on their way to the queue."""
        deadline = self._queue[0].enqueued + self.max_wait_s
        while len(self._queue) < self.max_batch_size:
            if self.adaptive and self._pending <= len(self._queue):
                return  # nothing else admitted: waiting could only add latency
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return

    def _take(self) -> list[_Item[T, R]]:
        batch: list[_Item[T, R]] = []
        dropped = 0
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if item.future.done():  # the request went away (cancelled)
                dropped += 1
            else:
                batch.append(item)
        if dropped:
            self._pending -= dropped
        return batch

    async def _execute(self, batch: list[_Item[T, R]]) -> None:
        start = time.monotonic()
        waits = [start - item.enqueued for item in batch]
        try:
            results = await self._run_sync(self._call, [item.value for item in batch], waits)
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherClosed("the service is shutting down"))
            raise
        except Exception as exc:  # every future of the batch gets the batch's error
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        finally:
            self._pending -= len(batch)
