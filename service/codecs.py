"""The codecs: every request's bytes -> arrays, and every response's arrays -> values, for
all transports (v1 REST, v2 REST JSON and binary data, gRPC).

Nothing here knows HTTP or gRPC; the transports move bytes and call these functions, the
data plane (:mod:`service.dataplane`) runs what they decode. Inputs:

- JSON: :func:`json_problem` (UTF-8, nesting depth: checked once per body, before any
  parser sees it) and :func:`parse_json`;
- images: :func:`decode_base64` (v1 JSON, v2 JSON), :func:`deserialize_bytes` (the v2
  BYTES binary form), :class:`Decoder` (encoded image file -> uint8 ``(H, W, C)`` at the
  classifier's input size, within a memory budget);
- tensors: :class:`InputTensor` (one v2 input, from any transport), :func:`image_blobs`,
  :func:`image_tensor`, :func:`as_float_array` and the shape and value checks;
- :func:`check_count`: the image-count limit, applied once, where the count is known.

Outputs: :func:`v1_body` (the v1 JSON objects) and :func:`output_array` with
:func:`json_values` / :func:`raw_bytes` (a v2 output tensor as JSON values or the
protocol's binary form); :func:`json_bytes` encodes an answer (orjson); receipts:
:func:`issue_receipts` signs one per scored input, :func:`read_receipt` checks one.

Where an image is decoded depends on its size, so that a request takes one thread hop:
bodies up to ``CONCEPTGUARD_INLINE_DECODE_BYTES`` are decoded by the batch worker itself
(:meth:`Decoder.decode`), larger ones in the thread pool before they are queued
(:meth:`Decoder.decode_in_pool`). Either way at most ``CONCEPTGUARD_DECODE_CONCURRENCY``
images are decoded at the same time per worker, which bounds the decode memory
(docs/reliability.md). A decode error is a :class:`~service.errors.ServiceError` with the
decoder's status and code, its message prefixed with ``image i:`` in a request of several.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import orjson

from conceptguard.concept_check import concepts_unavailable
from conceptguard.imaging import ImageError, png_pixels, preprocess_bytes
from conceptguard.scoring import Scores, top_reasons
from service.errors import ServiceError
from service.runtime_state import Loaded
from service.settings import Settings

log = logging.getLogger("conceptguard.service")

InputShape = tuple[int, int, int]  # (channels, height, width) of the classifier's input

# ---------------------------------------------------------------- JSON

_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_problem(body: bytes, max_depth: int) -> str | None:
    """Why ``body`` must not reach a JSON parser (non-UTF-8, nested deeper than
    ``max_depth``), or None. Deep nesting would exhaust the parser's recursion."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the request body is not UTF-8 JSON: {exc.reason} at byte {exc.start}"
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return None
    structure = np.frombuffer(_STRINGS.sub(b"", body), dtype=np.uint8)
    step = ((structure == ord("[")) | (structure == ord("{"))).astype(np.int32) - (
        (structure == ord("]")) | (structure == ord("}"))).astype(np.int32)
    depth = int(np.cumsum(step).max()) if step.size else 0
    if depth > max_depth:
        return (f"the request JSON is nested {depth} levels deep; the limit is {max_depth} "
                "(CONCEPTGUARD_MAX_JSON_DEPTH)")
    return None


def parse_json(body: bytes, max_depth: int, *, guarded: bool = False) -> Any:
    """A JSON request body as Python values; 400 when it is empty, not JSON, or fails
    :func:`json_problem` (skipped when ``guarded``: the middleware already ran it)."""
    if not body:
        raise ServiceError("the request body is empty; expected JSON", 400, "invalid_json")
    if not guarded:
        problem = json_problem(body, max_depth)
        if problem is not None:
            raise ServiceError(problem, 400, "invalid_json")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ServiceError(f"the request body is not valid JSON: {exc}", 400,
                           "invalid_json") from exc


def json_bytes(value: Any) -> bytes:
    """An answer as compact UTF-8 JSON (orjson: several times faster than ``json`` on the
    answers' many floats). orjson writes a NaN or infinite float as ``null``: the codecs
    refuse non-finite scores before (:func:`check_finite`, 422)."""
    return orjson.dumps(value)


# ---------------------------------------------------------------- counts and bytes


def check_count(n: int, limit: int, what: str = "images", *, at_least: bool = False) -> None:
    """400 for none, 413 for more than ``limit`` (CONCEPTGUARD_MAX_IMAGES_PER_REQUEST);
    ``at_least``: the parser stopped counting at ``n``, so there may be more."""
    if n == 0:
        raise ServiceError(f"no {what} in the request", 400, "empty")
    if n > limit:
        raise ServiceError(f"{'at least ' if at_least else ''}{n} {what} in one request; the "
                           f"limit is {limit} (CONCEPTGUARD_MAX_IMAGES_PER_REQUEST)", 413,
                           "too_many_images")


def decode_base64(text: str, where: str) -> bytes:
    """Base64 (or a ``data:`` URL) -> bytes; 400 naming ``where`` when it is not valid."""
    if text.startswith("data:"):
        _, sep, text = text.partition(",")
        if not sep:
            raise ServiceError(f"{where}: a data URL without ','", 400, "invalid_base64")
    if any(c.isspace() for c in text[:80]) or "\n" in text:
        text = "".join(text.split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(f"{where} is not valid base64: {exc}", 400, "invalid_base64") from exc


def deserialize_bytes(raw: bytes, what: str) -> list[bytes]:
    """BYTES elements: each a 4-byte little-endian length, then that many bytes."""
    out: list[bytes] = []
    view = memoryview(raw)
    pos = 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise ServiceError(f"{what}: truncated BYTES element length at byte {pos}", 400,
                               "invalid_tensor")
        (size,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + size > len(view):
            raise ServiceError(f"{what}: BYTES element {len(out)} claims {size} bytes, "
                               f"{len(view) - pos} left", 400, "invalid_tensor")
        out.append(bytes(view[pos:pos + size]))
        pos += size
    return out


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """The inverse of :func:`deserialize_bytes`."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# ---------------------------------------------------------------- images


def where(i: int, n: int) -> str:
    """The prefix that names image ``i`` of ``n`` in an error message."""
    return f"image {i}: " if n > 1 else ""


# an image counts as small (cheap to decode) up to this many times the input's pixels
SMALL_PIXELS_FACTOR = 4


class Decoder:
    """Decodes untrusted image bytes to uint8 ``(H, W, C)`` at the input size."""

    def __init__(self, settings: Settings):
        self.max_bytes = settings.max_upload_bytes
        self.max_pixels = settings.max_image_pixels
        self.inline_bytes = settings.inline_decode_bytes
        self._budget = threading.BoundedSemaphore(settings.decode_concurrency)
        # the pool path leaves a place for the batch worker's own decodes when there are two
        self._pool = anyio.CapacityLimiter(max(1, settings.decode_concurrency - 1))

    def inline(self, data: bytes) -> bool:
        """True when the batch worker decodes these bytes (small enough)."""
        return len(data) <= self.inline_bytes

    def small(self, data: bytes, shape: InputShape) -> bool:
        """True when ``data`` is a PNG whose header declares at most
        :data:`SMALL_PIXELS_FACTOR` times the input's pixels: its decode is as cheap as the
        input size makes it (any other format, or a larger image, may not be)."""
        _, size, _ = shape
        pixels = png_pixels(data)
        return pixels is not None and pixels <= SMALL_PIXELS_FACTOR * size * size

    def decode(self, data: bytes, shape: InputShape, prefix: str = "") -> np.ndarray:
        """Blocking decode and resize; :class:`ServiceError` for bad bytes."""
        channels, size, _ = shape
        with self._budget:
            try:
                return preprocess_bytes(data, input_size=size, channels=channels,
                                        max_bytes=self.max_bytes, max_pixels=self.max_pixels)
            except ImageError as exc:
                raise ServiceError(f"{prefix}{exc}", exc.status, exc.code) from exc
            except Exception as exc:  # a decoder bug on hostile bytes is still bad input
                log.warning("image decoder failed: %r", exc)
                raise ServiceError(f"{prefix}could not decode the image: {exc}", 400,
                                   "corrupt") from exc

    async def decode_in_pool(self, data: bytes, shape: InputShape, prefix: str = ""
                             ) -> np.ndarray:
        """:meth:`decode` in the thread pool (for large bodies)."""
        return await anyio.to_thread.run_sync(self.decode, data, shape, prefix,
                                              limiter=self._pool)


# ---------------------------------------------------------------- tensors

IMAGE_INPUT = "image"  # BYTES [N]: encoded image files (base64 in JSON, raw in binary data)
TENSOR_INPUT = "input"  # FP32 [N, C, H, W] in [0, 1]


@dataclass
class InputTensor:
    """One v2 request input: ``data`` holds JSON values (REST) or a numpy array / list of
    bytes (gRPC ``contents``); ``raw`` holds the tensor's bytes (binary data, raw contents)."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    raw: bytes | None = None


def expect_datatype(inp: InputTensor, want: str) -> None:
    if inp.datatype.upper() != want:
        raise ServiceError(f"input '{inp.name}' must have datatype {want}, got {inp.datatype}",
                           422, "invalid_tensor")


def image_blobs(inp: InputTensor, limit: int) -> list[bytes]:
    """BYTES [N] (or [N, 1]): one encoded image file per element; at most ``limit``."""
    shape = inp.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise ServiceError(f"input '{IMAGE_INPUT}' must have shape [N] (one encoded image per "
                           f"element), got {shape}", 422, "invalid_tensor")
    n = shape[0]
    check_count(n, limit)
    if inp.raw is not None:
        blobs = deserialize_bytes(inp.raw, f"input '{IMAGE_INPUT}'")
    elif inp.data is not None and all(isinstance(d, bytes) for d in inp.data):
        blobs = list(inp.data)  # gRPC bytes_contents: raw bytes already
    else:
        data = inp.data if inp.data is not None else []
        if len(shape) == 2:
            data = [d[0] if isinstance(d, list) and len(d) == 1 else d for d in data]
        blobs = []
        for i, item in enumerate(data):
            if not isinstance(item, str):
                raise ServiceError(f"input '{IMAGE_INPUT}' data[{i}] must be a base64 string",
                                   422, "invalid_tensor")
            blobs.append(decode_base64(item, f"input '{IMAGE_INPUT}' data[{i}]"))
    if len(blobs) != n:
        raise ServiceError(f"input '{IMAGE_INPUT}': shape {shape} means {n} elements, the "
                           f"data has {len(blobs)}", 422, "invalid_tensor")
    return blobs


def image_tensor(inp: InputTensor, loaded: Loaded, limit: int) -> np.ndarray:
    """FP32 [N, C, H, W] (JSON values or binary data) -> a checked float32 array."""
    c, h, w = loaded.input_shape
    shape = inp.shape
    if len(shape) != 4:
        raise ServiceError(f"input '{TENSOR_INPUT}' must have shape [N, {c}, {h}, {w}], got "
                           f"{shape}", 422, "invalid_tensor")
    check_count(shape[0], limit)
    want = math.prod(shape)
    if inp.raw is not None:
        if len(inp.raw) != 4 * want:
            raise ServiceError(f"input '{TENSOR_INPUT}': shape {shape} means {want} FP32 "
                               f"values ({4 * want} bytes), the binary data has "
                               f"{len(inp.raw)} bytes", 422, "invalid_tensor")
        arr = np.frombuffer(inp.raw, dtype="<f4").astype(np.float32, copy=False)
    else:
        arr = as_float_array(inp.data if inp.data is not None else [],
                             f"input '{TENSOR_INPUT}' data")
    if arr.size != want:
        raise ServiceError(f"input '{TENSOR_INPUT}': shape {shape} means {want} values, data "
                           f"has {arr.size}", 422, "invalid_tensor")
    images = arr.reshape(shape)
    check_image_tensor(images, loaded)
    return images


def as_float_array(data: object, name: str) -> np.ndarray:
    """JSON numbers (nested lists) -> float32 array; 422 on ragged or non-numeric data."""
    try:
        arr = np.asarray(data)
    except ValueError as exc:
        raise ServiceError(f"{name} is not a regular (rectangular) array: {exc}", 422,
                           "invalid_tensor") from exc
    if arr.dtype.kind not in "fiu":
        raise ServiceError(f"{name} must hold numbers only, got {arr.dtype.name} data", 422,
                           "invalid_tensor")
    return arr.astype(np.float32, copy=False)


def check_image_tensor(images: np.ndarray, loaded: Loaded) -> None:
    c, h, w = loaded.input_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, h, w):
        raise ServiceError(f"image tensor must have shape [N, {c}, {h}, {w}] (FP32 in [0, 1]), "
                           f"got {list(images.shape)}", 422, "invalid_tensor")
    if images.dtype != np.float32:
        raise ServiceError(f"image tensor must be float32, got {images.dtype}", 422,
                           "invalid_tensor")
    if not np.isfinite(images).all():
        raise ServiceError("image tensor contains NaN or infinite values", 422,
                           "invalid_tensor")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ServiceError(f"image values must lie in [0, 1], got [{images.min():.4g}, "
                           f"{images.max():.4g}]", 422, "invalid_tensor")


def check_finite(what: str, values: np.ndarray) -> None:
    """422 when an intermediate value overflowed (e.g. features near the float32 limit)."""
    if not np.isfinite(np.asarray(values)).all():
        raise ServiceError(f"non-finite {what} (the inputs are too large in magnitude)", 422,
                           "invalid_tensor")


def check_feature_tensors(features: np.ndarray, logits: np.ndarray | None,
                          loaded: Loaded) -> None:
    d, k = loaded.feature_dim, loaded.num_classes
    if features.ndim != 2 or features.shape[1] != d:
        raise ServiceError(f"features must have shape [N, {d}], got {list(features.shape)}",
                           422, "invalid_tensor")
    if not np.isfinite(features).all():
        raise ServiceError("features contain NaN or infinite values", 422, "invalid_tensor")
    if logits is None:
        return
    if logits.ndim != 2 or logits.shape != (features.shape[0], k):
        raise ServiceError(f"logits must have shape [{features.shape[0]}, {k}] (one row per "
                           f"features row), got {list(logits.shape)}", 422, "invalid_tensor")
    if not np.isfinite(logits).all():
        raise ServiceError("logits contain NaN or infinite values", 422, "invalid_tensor")


# ---------------------------------------------------------------- v1 outputs


def top_probabilities(loaded: Loaded, row: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable classes of one input's probabilities, most probable first."""
    k = min(k, len(row))
    top = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
    top = top[np.argsort(-row[top], kind="stable")]
    classes = loaded.classes
    return [(classes[j], float(row[j])) for j in top.tolist()]


def labels(loaded: Loaded, scores: Scores) -> list[str]:
    """The predicted class name of each input."""
    classes = loaded.classes
    return [classes[p] for p in scores.predictions.tolist()]


def reason_summary(label: str, concepts: list[tuple[str, float]],
                   unavailable: str | None = None) -> str:
    against = [f"{c} ({v:+.2f})" for c, v in concepts if v < 0]
    support = [f"{c} ({v:+.2f})" for c, v in concepts if v >= 0]
    parts = [f"predicted {label}"]
    if against:
        parts.append("evidence against: " + ", ".join(against))
    if support:
        parts.append("evidence for: " + ", ".join(support))
    if unavailable is not None and not concepts:
        parts.append("no concepts named (concept competence check)")
    return "; ".join(parts)


def concept_gate(loaded: Loaded, names: Sequence[str]) -> dict[str, str | None]:
    """For each predicted class name: why concepts may not be named for it under the bank's
    concept competence check (:func:`conceptguard.concept_check.concepts_unavailable`), or
    None where they may. v1 and v2 both name concepts only where this allows. Worked out
    once per bank for all its classes (kept with the bank, :class:`Loaded`)."""
    cache: dict[Any, Any] | None = getattr(loaded, "_cache", None)
    gate = None if cache is None else cache.get("concept_gate")
    if gate is None:
        competence = (loaded.manifest.model_extra or {}).get("concept_competence")
        gate = {c: concepts_unavailable(competence, c) for c in {*loaded.classes, *names}}
        if cache is not None:
            cache["concept_gate"] = gate
    return gate


def v1_rows(loaded: Loaded, scores: Scores, settings: Settings) -> list[dict[str, Any]]:
    """Per-input v1 dicts (plain Python types, ready for JSON)."""
    names = labels(loaded, scores)
    preds = scores.predictions.tolist()
    trust = scores.trust.tolist()
    reject = scores.reject.tolist()
    p_mis = scores.p_misclassification.tolist()
    p_adv = scores.p_adversarial.tolist()
    p_unf = scores.p_unfamiliar.tolist()
    p_anom = scores.p_anomaly.tolist()
    paper = scores.paper_rule_reject.tolist()
    k = settings.reason_concepts
    unavailable = concept_gate(loaded, names)
    out = []
    for i, label in enumerate(names):
        # concepts only where the bank's check shows the VLM and aligner separate the class
        why = unavailable[label]
        concepts = (top_reasons(scores.contributions[i], loaded.concept_names, k)
                    if k > 0 and why is None else [])
        reason: dict[str, Any] = {"kind": scores.reason[i],
                                  "summary": reason_summary(label, concepts, why),
                                  "concepts": [{"concept": c, "contribution": v}
                                               for c, v in concepts]}
        if why is not None and k > 0:
            reason["concepts_unavailable"] = why
        out.append({
            "label": label,
            "class_index": preds[i],
            "probabilities": [{"label": lab, "probability": p} for lab, p in
                              top_probabilities(loaded, scores.probabilities[i],
                                                settings.top_k)],
            "trust": trust[i],
            "reject": reject[i],
            "reason": reason,
            "heads": {"misclassification": p_mis[i], "anomaly": p_anom[i],
                      "adversarial": p_adv[i], "unfamiliar": p_unf[i]},
            "paper_rule_reject": paper[i],
        })
    return out


def v1_body(loaded: Loaded, scores: Scores, settings: Settings, *, single: bool,
            latency_ms: float, request_id: str | None = None,
            receipts: Sequence[str] | None = None) -> dict[str, Any]:
    """The v1 response body: one object (``single``) or ``{"results": [...]}``, with the
    bank reference and the latency so far (422 when a score is not finite); with
    ``receipts`` (one per input, :func:`issue_receipts`) each result
    (or the single answer) carries its ``receipt``, and the body its ``request_id``."""
    for name in ("trust", "p_misclassification", "p_adversarial", "probabilities"):
        check_finite(name, getattr(scores, name))
    items = v1_rows(loaded, scores, settings)
    bank = loaded.bank_reference
    body: dict[str, Any]
    if single:
        body = {**items[0], "bank": bank, "latency_ms": latency_ms}
        if receipts is not None:
            body["receipt"] = receipts[0]
    else:
        if receipts is not None:
            for item, token in zip(items, receipts, strict=True):
                item["receipt"] = token
        body = {"results": items, "bank": bank, "latency_ms": latency_ms}
    if request_id is not None:
        body["request_id"] = request_id
    return body


# ---------------------------------------------------------------- receipts
# ``cg1.<payload>.<signature>``: the signed token each scored input's answer carries and
# ``POST /v1/feedback`` takes back (what it certifies, the key: :mod:`service.feedback`)

RECEIPT_PREFIX = "cg1"


@dataclass(frozen=True)
class Receipt:
    """What a receipt certifies about one scored input."""

    request_id: str
    index: int
    class_index: int
    reject: bool
    reason: str  # accepted / misclassification-like / adversarial-like / unfamiliar
    issued_at: int  # Unix seconds
    bank_id: str
    nonce: str = ""  # random per request: clients may reuse request ids

    @property
    def input_id(self) -> str:
        """The id of the input (one request may hold several; two requests may share a
        client-supplied request id, never a nonce)."""
        return f"{self.request_id}#{self.index}#{self.nonce}"

    def payload(self) -> list[Any]:
        """The signed fields, in this order (a JSON array)."""
        return [self.request_id, self.index, self.class_index, self.reject, self.reason,
                self.issued_at, self.bank_id, self.nonce]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_receipt(receipt: Receipt, key: bytes) -> str:
    return _signed(json.dumps(receipt.payload(), separators=(",", ":")), key)


def _signed(payload_json: str, key: bytes) -> str:
    head = f"{RECEIPT_PREFIX}.{_b64(payload_json.encode())}"
    mac = hmac.new(key, head.encode("ascii"), hashlib.sha256).digest()
    return f"{head}.{_b64(mac)}"


def sign_receipts(request_id: str, bank_id: str, issued_at: int, classes: list[int],
                  rejects: list[bool], reasons: list[str], key: bytes, nonce: str = ""
                  ) -> list[str]:
    """:func:`sign_receipt` for every input of a request: the same receipts, with the request's
    strings JSON-encoded once (a receipt per input costs one HMAC and some formatting)."""
    rid, bank, tail = json.dumps(request_id), json.dumps(bank_id), json.dumps(nonce)
    why = {r: json.dumps(r) for r in set(reasons)}
    return [_signed(f"[{rid},{i},{c},{'true' if r else 'false'},{why[w]},{issued_at},{bank},"
                    f"{tail}]", key)
            for i, (c, r, w) in enumerate(zip(classes, rejects, reasons, strict=True))]


def read_receipt(token: str, key: bytes) -> Receipt:
    """The receipt a token certifies: 422 when it is not a receipt at all, 403 when its
    signature is not the service's (forged, altered, or signed under another key)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != RECEIPT_PREFIX:
        raise ServiceError("receipt: not a conceptguard receipt (cg1.<payload>.<signature>)",
                           422, "invalid_request")
    head = f"{parts[0]}.{parts[1]}"
    try:
        mac = _unb64(parts[2])
    except (binascii.Error, ValueError):
        mac = b""
    want = hmac.new(key, head.encode("utf-8", "replace"), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, want):
        raise ServiceError("receipt: the signature does not match (forged, altered, or "
                           "issued under another feedback key)", 403, "forbidden")
    try:
        rid, index, cls, rej, why, ts, bank, nonce = json.loads(_unb64(parts[1]))
        return Receipt(request_id=str(rid), index=int(index), class_index=int(cls),
                       reject=bool(rej), reason=str(why), issued_at=int(ts), bank_id=str(bank),
                       nonce=str(nonce))
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:  # signed by us: only
        # a change of format makes it unreadable
        raise ServiceError("receipt: unreadable payload", 422, "invalid_request") from exc


def issue_receipts(key: bytes, request_id: str, bank_id: str, scores: Scores,
                   now: float | None = None) -> list[str]:
    """One receipt per scored input of a request, in order, issued ``now`` (default: the
    clock) under ``key`` (the feedback book's, :class:`service.feedback.FeedbackBook`), with
    a fresh nonce per request."""
    issued_at = int(time.time() if now is None else now)
    return sign_receipts(request_id, bank_id, issued_at, scores.predictions.tolist(),
                         scores.reject.tolist(), list(scores.reason), key,
                         secrets.token_hex(8))


# ---------------------------------------------------------------- v2 outputs

OUTPUT_DATATYPES = {"probabilities": "FP32", "label": "BYTES", "class_index": "INT64",
                    "trust": "FP32", "reject": "BOOL", "p_misclassification": "FP32",
                    "p_anomaly": "FP32", "p_adversarial": "FP32", "p_unfamiliar": "FP32",
                    # the "why", as v1's reason: its kind, its top concepts (in v1's
                    # order) and their signed contributions
                    "reason_kind": "BYTES", "reason_concepts": "BYTES",
                    "reason_contributions": "FP32", "paper_rule_reject": "BOOL"}
OUTPUTS = tuple(OUTPUT_DATATYPES)
# [N, k] outputs, k = CONCEPTGUARD_REASON_CONCEPTS (a setting, so -1 in the metadata)
PER_CONCEPT_OUTPUTS = frozenset({"reason_concepts", "reason_contributions"})
_LITTLE = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "BOOL": "|b1"}


def requested_outputs(names: Sequence[str] | None) -> list[str]:
    """The output names asked for (all when none); 400 naming unknown ones."""
    if not names:
        return list(OUTPUTS)
    unknown = [n for n in names if n not in OUTPUT_DATATYPES]
    if unknown:
        raise ServiceError(f"unknown output(s) {unknown}; available: {list(OUTPUTS)}", 400,
                           "invalid_request")
    return list(names)


def output_array(name: str, loaded: Loaded, r: Scores, reason_concepts: int = 3
                 ) -> tuple[str, list[int], np.ndarray]:
    """``(datatype, shape, values)`` of one output; BYTES values are an object array of
    ``bytes`` (UTF-8 labels); ``reason_concepts`` concepts per input in the reason outputs."""
    n = len(r)
    if name == "reason_kind":
        return "BYTES", [n], np.array([k.encode() for k in r.reason], dtype=object)
    if name == "paper_rule_reject":
        return "BOOL", [n], np.asarray(r.paper_rule_reject, dtype=bool)
    if name in PER_CONCEPT_OUTPUTS:
        # as v1: concepts only for a predicted class the bank's competence check lets name
        # them; the others keep the [N, k] shape with "" and 0.0 (v1: no concepts)
        k = min(max(reason_concepts, 0), len(loaded.concept_names))
        names = labels(loaded, r)
        allowed = concept_gate(loaded, names)
        blank = [("", 0.0)] * k
        tops = [top_reasons(r.contributions[i], loaded.concept_names, k)
                if k > 0 and allowed[names[i]] is None else blank for i in range(n)]
        if name == "reason_concepts":
            encoded = [c.encode() for top in tops for c, _ in top]
            return "BYTES", [n, k], np.array(encoded, dtype=object).reshape(n, k)
        values = [v for top in tops for _, v in top]
        return "FP32", [n, k], np.asarray(values, dtype=np.float32).reshape(n, k)
    if name == "probabilities":
        p = np.asarray(r.probabilities, dtype=np.float32)
        return "FP32", [n, p.shape[1]], p
    if name == "label":
        classes = loaded.classes
        return "BYTES", [n], np.array([classes[p].encode() for p in r.predictions.tolist()],
                                      dtype=object)
    if name == "class_index":
        return "INT64", [n], np.asarray(r.predictions, dtype=np.int64)
    if name == "reject":
        return "BOOL", [n], np.asarray(r.reject, dtype=bool)
    array = {"trust": r.trust, "p_misclassification": r.p_misclassification,
             "p_anomaly": r.p_anomaly, "p_adversarial": r.p_adversarial,
             "p_unfamiliar": r.p_unfamiliar}[name]
    return "FP32", [n], np.asarray(array, dtype=np.float32)


def json_values(datatype: str, values: np.ndarray) -> list[Any]:
    """Flat JSON values of an output (row-major)."""
    if datatype == "BYTES":
        return [v.decode() for v in values.ravel().tolist()]
    if datatype == "FP32":  # float64 repr of the float32 values, as before
        return values.astype(np.float64).ravel().tolist()
    return values.ravel().tolist()


def raw_bytes(datatype: str, values: np.ndarray) -> bytes:
    """The protocol's binary form: little-endian row-major; BYTES length-prefixed."""
    if datatype == "BYTES":
        return serialize_bytes(values.ravel().tolist())
    return np.ascontiguousarray(values, dtype=_LITTLE[datatype]).tobytes()
