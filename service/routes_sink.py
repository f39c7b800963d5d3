"""``POST /v1/events``: the inference-logger sink (see :mod:`service.sink`).

An event is checked at once (its ``ce-*`` headers and payload structure: 4xx when wrong) and
answered ``202 Accepted`` before anything is scored, so the serving stack that logs to it
waits for nothing. Request events go to a bounded queue that one task per worker drains
through the data plane (the same batching, scoring and metrics as ``/v1/classify``);
response events are paired with their request by ``ce-id`` in one table for every worker
of the host (``conceptguard-sink.sqlite`` in the state folder, which also keeps the halves
waiting across a restart; in memory without a folder). A bad event changes nothing for the
others: it is refused before it is queued.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service import metrics, v2_binary
from service.codecs import (
    IMAGE_INPUT,
    TENSOR_INPUT,
    InputTensor,
    image_blobs,
    image_tensor,
    parse_json,
)
from service.dataplane import DataPlane
from service.errors import ServiceError
from service.middleware import JSON_CHECKED_KEY
from service.oip import infer as infer_tensors
from service.runtime_state import Loaded, RuntimeState
from service.schemas import ErrorResponse
from service.shared_state import state_folder
from service.sink import (
    EventHead,
    PairResult,
    Pairs,
    read_head,
    request_as_v2,
    served_predictions,
)

log = logging.getLogger("conceptguard.sink")
router = APIRouter()

QUEUE_EVENTS = 256  # request events waiting to be scored, per worker
PAIR_TTL_S = 60.0  # a half waits this long for its other half
PAIR_CAP = 10_000  # halves waiting, at most
PAIRS_FILE = "conceptguard-sink.sqlite"  # in the state folder


def _pairs() -> Pairs:
    folder = state_folder()
    return Pairs(PAIR_TTL_S, PAIR_CAP, None if folder is None else folder / PAIRS_FILE)


@dataclass
class Sink:
    """One per worker: the queue of request events, its task, the pairing table (shared
    with the host's other workers through the state folder)."""

    queue: asyncio.Queue[tuple[EventHead, Loaded, list[InputTensor]]] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_EVENTS))
    pairs: Pairs = field(default_factory=_pairs)
    task: asyncio.Task[None] | None = None
    reported: tuple[int, int] = (0, 0)  # expired, evicted already counted

    def count_dropped(self) -> None:
        expired, evicted = self.pairs.expired, self.pairs.evicted
        if expired > self.reported[0]:
            metrics.SINK_PAIRS.labels("expired").inc(expired - self.reported[0])
        if evicted > self.reported[1]:
            metrics.SINK_PAIRS.labels("evicted").inc(evicted - self.reported[1])
        self.reported = (expired, evicted)

    def pair_done(self, result: PairResult | None) -> None:
        if result is None:
            return
        if result.unreadable:
            metrics.SINK_PAIRS.labels("unreadable").inc()
        else:
            metrics.SINK_PAIRS.labels("agree").inc(result.agree)
            metrics.SINK_PAIRS.labels("disagree").inc(result.disagree)


async def _sink(request: Request) -> Sink:
    sink: Sink | None = getattr(request.app.state, "sink", None)
    if sink is None:
        # opening the pairing table may wait on another worker's lock: not on the loop
        made = await anyio.to_thread.run_sync(Sink)
        sink = getattr(request.app.state, "sink", None) or made  # the first one made wins
        request.app.state.sink = sink
    if sink.task is None or sink.task.done():
        dp: DataPlane = request.app.state.dataplane
        sink.task = asyncio.get_running_loop().create_task(_drain(sink, dp),
                                                           name="conceptguard-sink")
    return sink


async def _drain(sink: Sink, dp: DataPlane) -> None:
    while True:
        head, loaded, tensors = await sink.queue.get()
        try:
            scores = await infer_tensors(dp, loaded, tensors)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bad image in a well-formed event, a full queue, ...
            metrics.SINK_EVENTS.labels("request", "failed").inc()
            log.warning("inference-logger event %s not monitored: %s", head.id, exc)
            continue
        finally:
            sink.queue.task_done()
        metrics.SINK_EVENTS.labels("request", "monitored").inc()
        try:  # SQLite, possibly waiting on another worker's write: not on the event loop
            result = await anyio.to_thread.run_sync(
                sink.pairs.monitored, head.id, scores.predictions.tolist(), time.time())
        except sqlite3.Error as exc:
            log.warning("inference-logger event %s: not paired: %s", head.id, exc)
            continue
        sink.pair_done(result)
        sink.count_dropped()


def _checked_tensors(body: dict[str, Any], loaded: Loaded, dp: DataPlane
                     ) -> list[InputTensor]:
    """The v2 inputs of a request event, checked as the v2 route checks them."""
    _, tensors = v2_binary.parse_request(json.dumps(body).encode(), {},
                                         dp.settings.max_json_depth, guarded=True)  # parsed
    if len(tensors) != 1 or tensors[0].name not in (IMAGE_INPUT, TENSOR_INPUT):
        raise ServiceError(f"request payload: expected one input, '{IMAGE_INPUT}' (BYTES) or "
                           f"'{TENSOR_INPUT}' (FP32)", 422, "invalid_request")
    inp = tensors[0]
    limit = dp.settings.max_images_per_request
    if inp.name == IMAGE_INPUT:
        image_blobs(inp, limit)
    else:
        image_tensor(inp, loaded, limit)
    return tensors


@router.post("/v1/events", status_code=202,
             responses={400: {"model": ErrorResponse, "description": "not a binary-mode "
                              "inference CloudEvent, or a payload that is not JSON"},
                        415: {"model": ErrorResponse, "description": "structured mode or a "
                                                                     "payload that is not JSON"},
                        422: {"model": ErrorResponse, "description": "a payload of the wrong "
                                                                     "structure"},
                        503: {"model": ErrorResponse, "description": "the event queue is full, "
                                                                     "or the pairing table busy"}},
             summary="Inference-logger sink: KServe's request and response CloudEvents")
async def events(request: Request) -> JSONResponse:
    """A CloudEvent in binary mode (``ce-id``, ``ce-type``, ``ce-source``,
    ``ce-specversion`` headers; the JSON payload as the body), as KServe's logger sends.
    Answered 202 at once; requests are scored in the background (the metrics of
    ``/v1/classify``), responses paired with their request by ``ce-id``."""
    kind = "request"
    try:
        head = read_head(request.headers)
        kind = head.kind
        state: RuntimeState = request.app.state.runtime_state
        loaded = state.require()
        payload = parse_json(await request.body(), request.app.state.settings.max_json_depth,
                             guarded=bool(request.scope.get(JSON_CHECKED_KEY)))
        sink = await _sink(request)
        if head.kind == "response":
            served = served_predictions(payload, list(loaded.classes))
            try:
                result = await anyio.to_thread.run_sync(sink.pairs.served, head.id, served,
                                                        time.time())
            except sqlite3.Error as exc:
                raise ServiceError(f"the pairing table is busy ({exc}); retry later", 503,
                                   "pairing_busy") from exc
            sink.pair_done(result)
            sink.count_dropped()
        else:
            dp: DataPlane = request.app.state.dataplane
            tensors = _checked_tensors(request_as_v2(payload, loaded.input_shape[0]), loaded,
                                       dp)
            try:
                sink.queue.put_nowait((head, loaded, tensors))
            except asyncio.QueueFull:
                metrics.SINK_EVENTS.labels(kind, "busy").inc()
                raise ServiceError(f"{QUEUE_EVENTS} inference-logger events are waiting; "
                                   "retry later", 503, "queue_full") from None
    except ServiceError as exc:
        if exc.status < 500:
            metrics.SINK_EVENTS.labels(kind, "invalid").inc()
        raise
    except Exception:
        metrics.SINK_EVENTS.labels(kind, "invalid").inc()
        raise
    metrics.SINK_EVENTS.labels(head.kind, "accepted").inc()
    return JSONResponse({"accepted": True, "id": head.id, "type": head.kind}, status_code=202)

