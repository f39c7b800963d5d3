"""The micro-batcher on its own: merging, max wait, errors, bounded queue, pass-through."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from service.batching import Batcher, QueueFull

T = TypeVar("T")


class Recorder:
    """A real batch function: doubles its inputs and records each batch's size."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None,
                 gate: threading.Event | None = None):
        self.sizes: list[int] = []
        self.calls: list[list[int]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.gate = gate  # when given, every batch waits for it (at most 30 s)
        self.lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self.lock:
            self.sizes.append(len(items))
            self.calls.append(list(items))
        if self.gate is not None:
            self.gate.wait(30.0)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [2 * i for i in items]


class Observed:
    def __init__(self) -> None:
        self.batches: list[tuple[int, Sequence[float]]] = []
        self.batch = self.batches.append
        self.pending: Any = None
        self.full = 0

    def watch(self, pending: Any) -> None:
        self.pending = pending

    def queue_full(self) -> None:
        self.full += 1


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_concurrent_submissions_merge_up_to_max_batch_size() -> None:
    fn = Recorder(delay_s=0.01)

    async def main() -> list[list[int]]:
        b = Batcher(fn, max_batch_size=8, max_wait_s=0.05, queue_size=1000)
        await b.start()
        try:
            return await asyncio.gather(*(b.submit([i]) for i in range(40)))
        finally:
            await b.close()

    results = run(main())
    assert results == [[2 * i] for i in range(40)]
    assert sum(fn.sizes) == 40
    assert max(fn.sizes) == 8
    assert len(fn.sizes) <= 6  # merged, not one call per item
    assert sorted(x for call in fn.calls for x in call) == list(range(40))


def test_multi_item_submissions_keep_order_and_split_across_batches() -> None:
    fn = Recorder()

    async def main() -> list[list[int]]:
        b = Batcher(fn, max_batch_size=4, max_wait_s=0.02, queue_size=100)
        await b.start()
        try:
            return await asyncio.gather(b.submit([1, 2, 3]), b.submit([4, 5, 6, 7, 8]))
        finally:
            await b.close()

    assert run(main()) == [[2, 4, 6], [8, 10, 12, 14, 16]]
    assert max(fn.sizes) <= 4


def test_lone_item_waits_at_most_max_wait() -> None:
    fn = Recorder()
    obs = Observed()

    async def main() -> float:
        b = Batcher(fn, max_batch_size=32, max_wait_s=0.05, queue_size=10, observer=obs)
        await b.start()
        try:
            t0 = time.monotonic()
            assert await b.submit([3]) == [6]
            return time.monotonic() - t0
        finally:
            await b.close()

    elapsed = run(main())
    assert 0.04 <= elapsed < 1.0  # it waited for company, then ran alone
    assert fn.sizes == [1]
    assert obs.batches[0][0] == 1 and obs.batches[0][1][0] >= 0.04


def test_full_batch_does_not_wait() -> None:
    fn = Recorder()

    async def main() -> float:
        b = Batcher(fn, max_batch_size=4, max_wait_s=5.0, queue_size=10)
        await b.start()
        try:
            t0 = time.monotonic()
            await b.submit([1, 2, 3, 4])
            return time.monotonic() - t0
        finally:
            await b.close()

    assert run(main()) < 2.0
    assert fn.sizes == [4]


def test_exception_is_set_on_every_future_of_the_batch() -> None:
    fn = Recorder(fail_on=3)

    async def main() -> list[object]:
        b = Batcher(fn, max_batch_size=8, max_wait_s=0.05, queue_size=100)
        await b.start()
        try:
            outcomes = await asyncio.gather(*(b.submit([i]) for i in range(5)),
                                            return_exceptions=True)
            after = await b.submit([10])  # the batcher keeps working
            return [*outcomes, after]
        finally:
            await b.close()

    outcomes = run(main())
    assert fn.sizes[0] == 5
    for o in outcomes[:5]:
        assert isinstance(o, ValueError) and "bad item 3" in str(o)
    assert outcomes[5] == [20]


def test_queue_full_raises_and_counts() -> None:
    gate = threading.Event()  # the first batch runs until the queue was found full
    fn = Recorder(gate=gate)
    obs = Observed()

    async def main() -> None:
        b = Batcher(fn, max_batch_size=2, max_wait_s=0.0, queue_size=3, observer=obs)
        await b.start()
        try:
            first = asyncio.create_task(b.submit([1, 2, 3]))
            await asyncio.sleep(0.05)
            assert b.pending == 3 and obs.pending() == 3  # what the depth gauge reads
            with pytest.raises(QueueFull) as info:
                await b.submit([4])
            assert info.value.capacity == 3 and info.value.pending == 3
            gate.set()
            assert await first == [2, 4, 6]
            assert b.pending == 0 and obs.pending() == 0
            assert await b.submit([4]) == [8]  # room again
        finally:
            await b.close()

    run(main())
    assert obs.full == 1


def test_a_request_larger_than_the_queue_is_refused() -> None:
    async def main() -> None:
        b = Batcher(Recorder(), max_batch_size=4, max_wait_s=0.0, queue_size=2)
        with pytest.raises(QueueFull):
            await b.submit([1, 2, 3])
        await b.close()

    run(main())


def test_one_capacity_rule_for_admission_and_reservation() -> None:
    """``has_room`` is the rule the service asks before reading a body (``n = 1``) and the
    one ``reserve`` applies: whenever it says no, a reservation of that size is refused."""
    async def main() -> None:
        b = Batcher(Recorder(), max_batch_size=4, max_wait_s=0.0, queue_size=3)
        assert b.has_room(3) and not b.has_room(4)
        with b.reserve(2):
            assert b.has_room(1) and not b.has_room(2)
            with pytest.raises(QueueFull):
                b.reserve(2).__enter__()
            with b.reserve(1):
                assert not b.has_room(1)
                with pytest.raises(QueueFull):
                    b.reserve(1).__enter__()
        assert b.has_room(3)  # the places are given back
        await b.close()

    run(main())


def test_max_batch_size_one_goes_straight_through() -> None:
    fn = Recorder(delay_s=0.01)

    async def main() -> list[list[int]]:
        b = Batcher(fn, max_batch_size=1, max_wait_s=1.0, queue_size=100)
        await b.start()
        try:
            t0 = time.monotonic()
            out = await asyncio.gather(*(b.submit([i]) for i in range(6)), b.submit([7, 8]))
            assert time.monotonic() - t0 < 0.9  # never waited for max_wait
            return out
        finally:
            await b.close()

    out = run(main())
    assert out == [[0], [2], [4], [6], [8], [10], [14, 16]]
    assert fn.sizes == [1] * 8


def test_straight_through_is_bounded_too() -> None:
    fn = Recorder(delay_s=0.1)

    async def main() -> list[object]:
        b = Batcher(fn, max_batch_size=1, max_wait_s=0.0, queue_size=1)
        return await asyncio.gather(*(b.submit([i]) for i in range(5)), return_exceptions=True)

    outcomes = run(main())
    assert sum(isinstance(o, QueueFull) for o in outcomes) >= 1
    assert any(o == [0] or isinstance(o, list) for o in outcomes)


def test_cancelled_submission_is_skipped() -> None:
    fn = Recorder(delay_s=0.05)

    async def main() -> None:
        b = Batcher(fn, max_batch_size=4, max_wait_s=0.2, queue_size=10)
        await b.start()
        try:
            doomed = asyncio.create_task(b.submit([1]))
            await asyncio.sleep(0.01)
            doomed.cancel()
            assert await b.submit([2]) == [4]
            assert b.pending == 0
        finally:
            await b.close()

    run(main())
    assert [1] not in fn.calls and fn.calls[-1] == [2]


def test_adaptive_dispatches_at_once_when_nothing_else_is_on_its_way() -> None:
    """A lone item runs without waiting for ``max_wait_s`` (30 s here; the test would
    fail on its 10 s guard, not on a timing bound of its own)."""
    fn = Recorder()

    async def main() -> list[int]:
        b = Batcher(fn, max_batch_size=32, max_wait_s=30.0, queue_size=10, adaptive=True)
        await b.start()
        try:
            return await asyncio.wait_for(b.submit([3]), timeout=10.0)
        finally:
            await b.close()

    assert run(main()) == [6]
    assert fn.sizes == [1]


def test_adaptive_waits_for_reserved_places_then_batches_them_together() -> None:
    fn = Recorder()

    async def main() -> tuple[list[int], list[int], bool]:
        b = Batcher(fn, max_batch_size=32, max_wait_s=30.0, queue_size=10, adaptive=True)
        await b.start()
        try:
            with b.reserve(1) as ticket:  # a request still decoding its image
                first = asyncio.create_task(b.submit([1]))
                for _ in range(20):  # let the loop run: it must keep waiting
                    await asyncio.sleep(0)
                waited = not first.done()
                second = await asyncio.wait_for(b.submit([2], ticket=ticket), timeout=10.0)
            return await asyncio.wait_for(first, timeout=10.0), second, waited
        finally:
            await b.close()

    first, second, waited = run(main())
    assert (first, second, waited) == ([2], [4], True)
    assert fn.sizes == [2]


def test_adaptive_stops_waiting_when_a_reservation_is_given_back() -> None:
    fn = Recorder()

    async def main() -> list[int]:
        b = Batcher(fn, max_batch_size=32, max_wait_s=30.0, queue_size=10, adaptive=True)
        await b.start()
        try:
            with b.reserve(1):  # e.g. its image fails to decode: never submitted
                task = asyncio.create_task(b.submit([5]))
                for _ in range(20):
                    await asyncio.sleep(0)
                assert not task.done()
            return await asyncio.wait_for(task, timeout=10.0)
        finally:
            await b.close()

    assert run(main()) == [10]
    assert fn.sizes == [1]


def test_an_exception_result_fails_only_its_own_item() -> None:
    """A batch function may return an exception for one item (an image that does not
    decode): that item's request fails with it, the others of the batch get their results,
    with and without batching."""

    def fn(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {i}") if i < 0 else 2 * i for i in items]

    async def main(max_batch_size: int) -> list[object]:
        b = Batcher(fn, max_batch_size=max_batch_size, max_wait_s=0.05, queue_size=100)
        await b.start()
        try:
            outcomes = await asyncio.gather(b.submit([1]), b.submit([2, -3, 4]),
                                            b.submit([5]), return_exceptions=True)
            return [*outcomes, b.pending]
        finally:
            await b.close()

    for size in (8, 1):
        first, bad, last, pending = run(main(size))
        assert first == [2] and last == [10]
        assert isinstance(bad, ValueError) and str(bad) == "bad -3"
        assert pending == 0  # the failed request's places were given back


# ---------------------------------------------------------------- a lone item inline


class ThreadRecorder(Recorder):
    """A :class:`Recorder` that also records which thread ran each batch."""

    def __init__(self, delays_s: Sequence[float] = ()):
        super().__init__()
        self.threads: list[int] = []
        self.delays_s = list(delays_s)

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.threads.append(threading.get_ident())
        if self.delays_s:
            time.sleep(self.delays_s.pop(0))
        if items == [-1]:
            return [ValueError("bad -1")]
        if items == [-2]:
            raise RuntimeError("the runtime failed")
        return super().__call__(items)


def lone_batcher(fn: ThreadRecorder, alone: bool = True, inline_below_s: float = 1.0,
                 adaptive: bool = True, inline_ok: Any = None
                 ) -> tuple[Batcher[int, int], Observed]:
    observed = Observed()
    b = Batcher(fn, max_batch_size=32, max_wait_s=30.0 if adaptive else 0.01, queue_size=10,
                adaptive=adaptive, observer=observed, alone=lambda: alone,
                inline_below_s=inline_below_s, inline_ok=inline_ok)
    return b, observed


def test_a_lone_item_runs_on_the_loop_thread_once_lone_runs_are_known_to_be_short() -> None:
    """The first lone item runs on the worker thread (no lone run timed yet); the next ones,
    alone and short, run on the event loop's thread, with the same results, the batch
    observed and the places given back."""
    fn = ThreadRecorder()

    async def main() -> tuple[list[list[int]], int, int]:
        b, observed = lone_batcher(fn)
        await b.start()
        try:
            results = [await asyncio.wait_for(b.submit([i]), timeout=10.0) for i in (1, 2, 3)]
            return results, b.pending, len(observed.batches)
        finally:
            await b.close()

    loop_thread = threading.get_ident()  # asyncio.run runs the loop in this thread
    results, pending, batches = run(main())
    assert results == [[2], [4], [6]] and pending == 0 and batches == 3
    assert fn.threads[0] != loop_thread
    assert fn.threads[1:] == [loop_thread, loop_thread]


@pytest.mark.parametrize("case", ["not alone", "disabled", "not adaptive", "not cheap"])
def test_a_lone_item_stays_on_the_worker_thread_unless_every_condition_holds(case: str
                                                                             ) -> None:
    fn = ThreadRecorder()

    async def main() -> list[list[int]]:
        b, _ = lone_batcher(fn, alone=case != "not alone",
                            inline_below_s=0.0 if case == "disabled" else 1.0,
                            adaptive=case != "not adaptive",
                            inline_ok=(lambda item: False) if case == "not cheap" else None)
        await b.start()
        try:
            return [await asyncio.wait_for(b.submit([i]), timeout=10.0) for i in (1, 2, 3)]
        finally:
            await b.close()

    loop_thread = threading.get_ident()
    assert run(main()) == [[2], [4], [6]]
    assert loop_thread not in fn.threads


def test_items_that_are_not_alone_in_the_batcher_still_merge() -> None:
    """With a request still holding a place (decoding), the next one is not alone: it is
    queued and the two run as one batch on the worker thread."""
    fn = ThreadRecorder()

    async def main() -> tuple[list[int], list[int]]:
        b, _ = lone_batcher(fn)
        await b.start()
        try:
            await b.submit([0])  # a lone run timed: inline is open from now on
            with b.reserve(1) as ticket:
                first = asyncio.create_task(b.submit([1]))
                for _ in range(20):
                    await asyncio.sleep(0)
                second = await asyncio.wait_for(b.submit([2], ticket=ticket), timeout=10.0)
            return await asyncio.wait_for(first, timeout=10.0), second
        finally:
            await b.close()

    loop_thread = threading.get_ident()
    assert run(main()) == ([2], [4])
    assert fn.sizes == [1, 2] and fn.threads[1] != loop_thread


SLOW_S = 0.5


def test_a_slow_lone_run_sends_the_next_ones_to_the_worker_thread_until_runs_are_short(
        ) -> None:
    """Lone runs: about 0 s (thread: the first), then SLOW_S (inline: the recent time is
    short); the recent time is then at least SLOW_S, above the bound, so the next ones run
    on the thread while it falls back by LONE_DECAY of the gap per short run: at least
    ``n`` of them (``n`` from the exact SLOW_S; a sleep lasts at least that long), and
    inline reopens within a few more."""
    from service.batching import LONE_DECAY

    fn = ThreadRecorder(delays_s=[0.0, SLOW_S])
    bound = 0.2  # far above a fast run, even one preempted on a busy machine
    n = 1  # short runs that bring SLOW_S to the bound: SLOW_S (1 - d)^n <= bound
    while SLOW_S * (1 - LONE_DECAY) ** n > bound:
        n += 1

    async def main() -> None:
        b, _ = lone_batcher(fn, inline_below_s=bound)
        await b.start()
        try:
            for i in range(n + 12):
                assert await asyncio.wait_for(b.submit([i]), timeout=10.0) == [2 * i]
        finally:
            await b.close()

    loop_thread = threading.get_ident()
    run(main())
    on_loop = [t == loop_thread for t in fn.threads]
    assert on_loop[:2] == [False, True]
    assert on_loop[2:2 + n] == [False] * n
    assert on_loop[-1] is True


def test_an_inline_failure_fails_its_request_and_gives_its_place_back() -> None:
    fn = ThreadRecorder()

    async def main() -> tuple[object, object, int, list[int]]:
        b, _ = lone_batcher(fn)
        await b.start()
        try:
            await b.submit([0])
            bad = await asyncio.gather(b.submit([-1]), return_exceptions=True)
            broken = await asyncio.gather(b.submit([-2]), return_exceptions=True)
            pending = b.pending
            return bad[0], broken[0], pending, await b.submit([4])
        finally:
            await b.close()

    loop_thread = threading.get_ident()
    bad, broken, pending, after = run(main())
    assert isinstance(bad, ValueError) and str(bad) == "bad -1"
    assert isinstance(broken, RuntimeError) and str(broken) == "the runtime failed"
    assert pending == 0 and after == [8]
    assert fn.threads[1:] == [loop_thread] * 3


def test_a_small_png_is_cheap_and_anything_else_is_not() -> None:
    """The service's inline test for encoded images: a PNG whose header declares at most
    SMALL_PIXELS_FACTOR times the input's pixels; not a larger PNG (however few bytes it
    has), another format, or bytes that are not an image."""
    import io

    import numpy as np
    from PIL import Image

    from service.codecs import SMALL_PIXELS_FACTOR, Decoder
    from service.settings import Settings

    def png(side: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((side, side), np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    decoder = Decoder(Settings.model_construct(max_upload_bytes=1 << 20,
                                               max_image_pixels=1 << 26,
                                               inline_decode_bytes=1 << 17,
                                               decode_concurrency=2))
    shape = (1, 28, 28)
    largest = int((SMALL_PIXELS_FACTOR * 28 * 28) ** 0.5)  # a square at the bound
    assert decoder.small(png(28), shape) and decoder.small(png(largest), shape)
    big = png(1000)  # a million pixels in about a kilobyte
    assert len(big) < 8192 and not decoder.small(big, shape)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="JPEG")
    assert not decoder.small(buf.getvalue(), shape)
    assert not decoder.small(b"\x89PNG\r\n\x1a\n", shape)  # a signature, no header
