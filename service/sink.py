"""An inference-logger sink: KServe's logger CloudEvents in, the monitor's metrics out.

A KServe InferenceService whose predictor has ``logger: {mode: all, url: ...}`` sends every
request and every response it serves as a CloudEvent in *binary mode*: the payload is the
HTTP body (JSON), the event attributes are ``ce-*`` headers (``ce-id``, ``ce-type``,
``ce-source``, ``ce-specversion``; KServe's types are ``org.kubeflow.serving.inference.request``
and ``...response``, and a request and its response share the ``ce-id``). This module reads
such events (pure functions and a bounded pairing table); :mod:`service.routes_sink` serves
them.

Payloads of an image classifier:

* request, v1 (``{"instances": [...]}``): each instance an encoded image in base64 (a string,
  ``{"b64": ...}`` or ``{"image_bytes": {"b64": ...}}``) or a pixel array ``[C, H, W]`` (or
  ``[H, W]`` for one channel) with values in [0, 1];
* request, v2 (``{"inputs": [...]}``): the service's own v2 inputs (``image`` BYTES [N] or
  ``input`` FP32 [N, C, H, W]);
* response, v1 (``{"predictions": [...]}``): per input a class index, a class name, a list of
  class scores, or an object with ``class_index``, ``label`` or ``probabilities``;
* response, v2 (``{"outputs": [...]}``): an integer output of shape [N] (class indexes), a
  BYTES output of class names, or an FP32 output [N, classes] of scores.

The requests are monitored (the served inputs, scored with the bank, counted in the same
metrics as ``/v1/classify``); the response gives the served model's predicted classes, which
are compared with the bank classifier's once both halves of a ``ce-id`` have arrived.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.codecs import decode_base64
from service.errors import ServiceError
from service.shared_state import connect

EventKind = Literal["request", "response"]
SPEC_VERSIONS = ("1.0", "0.3")
MAX_ID = 256


@dataclass(frozen=True)
class EventHead:
    id: str
    kind: EventKind
    type: str
    source: str


def _bad(message: str) -> ServiceError:
    return ServiceError(message, 400, "invalid_event")


def read_head(headers: Mapping[str, str]) -> EventHead:
    """The CloudEvent attributes of a binary-mode event (400 ``invalid_event`` when one is
    missing or wrong; 415 for structured mode or a payload that is not JSON)."""
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/cloudevents+json":
        raise ServiceError("structured-mode CloudEvents are not read: send binary mode "
                           "(ce-* headers, the payload as the body), as KServe's logger does",
                           415, "unsupported_media_type")
    missing = [h for h in ("ce-id", "ce-type", "ce-source", "ce-specversion")
               if not headers.get(h, "").strip()]
    if missing:
        raise _bad(f"not a binary-mode CloudEvent: missing header(s) {', '.join(missing)}")
    spec = headers["ce-specversion"].strip()
    if spec not in SPEC_VERSIONS:
        raise _bad(f"ce-specversion {spec!r} is not one of {', '.join(SPEC_VERSIONS)}")
    event_id = headers["ce-id"].strip()
    if len(event_id) > MAX_ID:
        raise _bad(f"ce-id longer than {MAX_ID} characters")
    etype = headers["ce-type"].strip()
    if etype.endswith("inference.request"):
        kind: EventKind = "request"
    elif etype.endswith("inference.response"):
        kind = "response"
    else:
        raise _bad(f"ce-type {etype!r} is neither an inference request nor a response "
                   "(KServe: org.kubeflow.serving.inference.request / .response)")
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise ServiceError(f"the payload must be JSON, got Content-Type {ctype!r}", 415,
                           "unsupported_media_type")
    return EventHead(event_id, kind, etype, headers["ce-source"].strip())


# ---------------------------------------------------------------- requests


def _b64_of(instance: Any) -> str | None:
    if isinstance(instance, str):
        return instance
    if isinstance(instance, dict):
        inner = instance.get("image_bytes", instance)
        if isinstance(inner, dict) and isinstance(inner.get("b64"), str):
            return inner["b64"]
    return None


def request_as_v2(payload: Any, channels: int) -> dict[str, Any]:
    """A request payload (v1 or v2) as the body of this service's v2 infer call."""
    if not isinstance(payload, dict):
        raise ServiceError("request payload: expected a JSON object with 'instances' (v1) "
                           "or 'inputs' (v2)", 422, "invalid_request")
    if "inputs" in payload:
        return payload
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ServiceError("request payload: 'instances' (v1) or 'inputs' (v2) must be a "
                           "non-empty list", 422, "invalid_request")
    b64 = [_b64_of(x) for x in instances]
    if all(s is not None for s in b64):
        for i, s in enumerate(b64):
            decode_base64(s or "", f"instances[{i}]")  # checked as the v2 route checks it
        return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(b64)],
                            "data": b64}]}
    try:
        arr = np.asarray(instances, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise ServiceError("request payload: each instance must be a base64 image or a pixel "
                           "array [C, H, W] (all of one shape)", 422, "invalid_tensor") from exc
    if arr.ndim == 3 and channels == 1:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ServiceError(f"request payload: pixel instances must be [C, H, W], got "
                           f"{list(arr.shape[1:])}", 422, "invalid_tensor")
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(arr.shape),
                        "data": arr.ravel().tolist()}]}


# ---------------------------------------------------------------- responses


def _argmax_rows(rows: Any, n_classes: int) -> list[int] | None:
    arr = np.asarray(rows, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != n_classes:
        return None
    return arr.argmax(axis=1).tolist()


def _index(value: Any, classes: list[str]) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 <= value < len(classes):
        return value
    if isinstance(value, str) and value in classes:
        return classes.index(value)
    return None


def served_predictions(payload: Any, classes: list[str]) -> list[int] | None:
    """The served model's predicted class indexes from a response payload (v1 or v2);
    None when the payload holds none this reader understands."""
    if not isinstance(payload, dict):
        return None
    try:
        if isinstance(payload.get("predictions"), list):
            return _v1_predictions(payload["predictions"], classes)
        if isinstance(payload.get("outputs"), list):
            return _v2_predictions(payload["outputs"], classes)
    except (ValueError, TypeError):
        return None
    return None


def _v1_predictions(preds: list[Any], classes: list[str]) -> list[int] | None:
    if preds and all(isinstance(p, list) for p in preds):
        return _argmax_rows(preds, len(classes))
    out = []
    for p in preds:
        if isinstance(p, dict):
            for key in ("class_index", "label", "class"):
                if key in p:
                    p = p[key]
                    break
            else:
                scores = p.get("probabilities", p.get("scores"))
                rows = _argmax_rows([scores], len(classes)) if scores is not None else None
                p = rows[0] if rows else None
        idx = _index(p, classes)
        if idx is None:
            return None
        out.append(idx)
    return out


def _v2_predictions(outputs: list[Any], classes: list[str]) -> list[int] | None:
    outs = [o for o in outputs if isinstance(o, dict) and isinstance(o.get("shape"), list)]
    for o in outs:  # class indexes first, then names, then scores
        if str(o.get("datatype", "")).upper().startswith(("INT", "UINT")) and len(
                o["shape"]) == 1:
            got = [_index(v, classes) for v in o.get("data", [])]
            if got and all(g is not None for g in got):
                return [int(g) for g in got if g is not None]
    for o in outs:
        if str(o.get("datatype", "")).upper() == "BYTES":
            got = [_index(v, classes) for v in o.get("data", [])]
            if got and all(g is not None for g in got):
                return [int(g) for g in got if g is not None]
    for o in outs:
        if str(o.get("datatype", "")).upper().startswith("FP") and len(o["shape"]) == 2:
            n, k = o["shape"]
            data = np.asarray(o.get("data", []), dtype=np.float64)
            if data.size == n * k:
                got = _argmax_rows(data.reshape(n, k), len(classes))
                if got is not None:
                    return got
    return None


# ---------------------------------------------------------------- pairing


@dataclass(frozen=True)
class PairResult:
    agree: int
    disagree: int
    unreadable: bool  # the response held no predictions this reader understands


class Pairs:
    """Halves of ``ce-id`` pairs waiting for the other half: at most ``cap`` of them, each
    for at most ``ttl_s`` seconds (then dropped and counted).

    The table is SQLite: in memory, or with ``path`` a file in the state folder, so that the
    workers of a host (and the replicas sharing the folder) pair the halves any of them took,
    and halves still waiting survive a restart. Each step is one transaction
    (``BEGIN IMMEDIATE``), so two workers taking the two halves of one id at once pair them
    once. ``now`` is wall-clock time (Unix seconds), which every process shares.
    ``expired``/``evicted`` count the halves this process dropped."""

    def __init__(self, ttl_s: float, cap: int, path: Path | None = None):
        self.ttl_s = ttl_s
        self.cap = cap
        self.expired = 0
        self.evicted = 0
        self._lock = threading.Lock()
        self._db = connect(path, ("CREATE TABLE IF NOT EXISTS halves (id TEXT PRIMARY KEY, "
                                  "at REAL NOT NULL, monitored TEXT, served TEXT, "
                                  "unreadable INTEGER NOT NULL DEFAULT 0)",
                                  "CREATE INDEX IF NOT EXISTS halves_at ON halves (at)"))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM halves").fetchone()[0])

    def monitored(self, event_id: str, classes: list[int], now: float) -> PairResult | None:
        """The bank classifier's classes for the request of ``event_id``; the pair's result
        once the response's half is there too."""
        return self._put(event_id, "monitored", classes, now)

    def served(self, event_id: str, classes: list[int] | None, now: float
               ) -> PairResult | None:
        """The served model's classes from the response of ``event_id`` (None: unreadable)."""
        return self._put(event_id, "served", classes, now)

    def _put(self, event_id: str, column: str, classes: list[int] | None, now: float
             ) -> PairResult | None:
        value = None if classes is None else json.dumps([int(c) for c in classes])
        with self._lock:
            db = self._db
            counted = (self.expired, self.evicted)  # restored if the transaction rolls back
            db.execute("BEGIN IMMEDIATE")
            try:
                self._expire(now)
                row = db.execute("SELECT monitored, served, unreadable FROM halves "
                                 "WHERE id = ?", (event_id,)).fetchone()
                if row is None:
                    self._make_room()
                    row = (None, None, 0)
                monitored, served, unreadable = row
                if column == "monitored":
                    monitored = value
                else:
                    served, unreadable = value, int(classes is None)
                if monitored is not None and (served is not None or unreadable):
                    result = _result(json.loads(monitored),
                                     None if served is None else json.loads(served))
                    db.execute("DELETE FROM halves WHERE id = ?", (event_id,))
                    db.execute("COMMIT")
                    return result
                db.execute("INSERT INTO halves (id, at, monitored, served, unreadable) "
                           "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                           "monitored = excluded.monitored, served = excluded.served, "
                           "unreadable = excluded.unreadable",
                           (event_id, now, monitored, served, unreadable))
                db.execute("COMMIT")
                return None
            except BaseException:
                db.execute("ROLLBACK")
                self.expired, self.evicted = counted
                raise

    def _make_room(self) -> None:
        over = int(self._db.execute("SELECT COUNT(*) FROM halves").fetchone()[0]) - self.cap + 1
        if over > 0:  # the oldest go
            cur = self._db.execute("DELETE FROM halves WHERE id IN (SELECT id FROM halves "
                                   "ORDER BY at, rowid LIMIT ?)", (over,))
            self.evicted += cur.rowcount

    def _expire(self, now: float) -> None:
        cur = self._db.execute("DELETE FROM halves WHERE at < ?", (now - self.ttl_s,))
        self.expired += cur.rowcount

    def expire(self, now: float) -> None:
        """Drop (and count) the halves older than the TTL."""
        with self._lock:
            self._expire(now)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _result(monitored: list[int], served: list[int] | None) -> PairResult:
    if served is None or len(served) != len(monitored):
        return PairResult(0, 0, True)
    agree = sum(int(a == b) for a, b in zip(monitored, served, strict=True))
    return PairResult(agree, len(served) - agree, False)
