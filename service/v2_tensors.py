"""Open Inference Protocol input tensors, shared by every v2 transport (REST JSON, REST
binary data, gRPC): input tensors -> the data plane -> :class:`~conceptguard.scoring.Scores`.

The transports only move bytes: REST reads JSON values or the binary tensor data extension's
blobs, gRPC reads ``contents`` or ``raw_input_contents``; all of them build an
:class:`InputTensor` and call :func:`infer`, which calls :class:`service.dataplane.DataPlane`
(its decoding, batcher and scoring). The scores are encoded by :mod:`service.encode_v2`.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from conceptguard.scoring import Scores
from service.dataplane import DataPlane, as_float_array
from service.encode_v2 import OUTPUT_DATATYPES, OUTPUTS, PER_CONCEPT_OUTPUTS
from service.errors import ServiceError
from service.routes_v1 import decode_base64
from service.runtime_state import Loaded

IMAGE_INPUT = "image"  # BYTES [N]: encoded image files (base64 in JSON, raw in binary data)
TENSOR_INPUT = "input"  # FP32 [N, C, H, W] in [0, 1]
# the protocol extensions served (GET /v2, gRPC ServerMetadata)
EXTENSIONS = ["binary_tensor_data", "statistics"]


@dataclass
class InputTensor:
    """One request input: ``data`` holds JSON values (REST) or a numpy array / list of bytes
    (gRPC ``contents``); ``raw`` holds the tensor's bytes (binary data, raw contents)."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    raw: bytes | None = None


def platform(loaded: Loaded) -> str:
    return "onnxruntime_onnx" if loaded.runtime.name == "onnx" else "pytorch_torch"


def model_metadata(loaded: Loaded) -> dict[str, Any]:
    c, h, w = loaded.input_shape
    k = loaded.num_classes
    shapes = {"probabilities": [-1, k], **{n: [-1, -1] for n in PER_CONCEPT_OUTPUTS}}
    outputs = [{"name": name, "datatype": dt, "shape": shapes.get(name, [-1])}
               for name, dt in OUTPUT_DATATYPES.items()]
    return {
        "name": loaded.model_name,
        "versions": [loaded.bank_id],
        "platform": platform(loaded),
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, c, h, w]},
        ],
        "outputs": outputs,
    }


def resolve_model(loaded: Loaded, name: str, version: str | None = None) -> Loaded:
    if name != loaded.model_name:
        raise ServiceError(f"unknown model '{name}'; this server serves '{loaded.model_name}'",
                           404, "unknown_model")
    if version and version != loaded.bank_id:
        raise ServiceError(f"model '{name}' has no version '{version}'; the version served is "
                           f"'{loaded.bank_id}'", 404, "unknown_version")
    return loaded


def requested_outputs(names: Sequence[str] | None) -> list[str]:
    if not names:
        return list(OUTPUTS)
    unknown = [n for n in names if n not in OUTPUT_DATATYPES]
    if unknown:
        raise ServiceError(f"unknown output(s) {unknown}; available: {list(OUTPUTS)}", 400,
                           "invalid_request")
    return list(names)


# ---------------------------------------------------------------- inference


async def infer(dp: DataPlane, loaded: Loaded, inputs: Sequence[InputTensor],
                stats: ModelStats | None = None) -> Scores:
    """Score one request's input through the data plane (decoding, batcher, scoring)."""
    t0 = time.perf_counter_ns()
    try:
        results = await _infer(dp, loaded, inputs)
    except BaseException:
        if stats is not None:
            stats.failure(loaded, time.perf_counter_ns() - t0)
        raise
    if stats is not None:
        stats.success(loaded, len(results), time.perf_counter_ns() - t0)
    return results


async def _infer(dp: DataPlane, loaded: Loaded, inputs: Sequence[InputTensor]) -> Scores:
    if len(inputs) != 1:
        raise ServiceError(f"expected exactly one input ('{IMAGE_INPUT}' BYTES [N] or "
                           f"'{TENSOR_INPUT}' FP32 [N, C, H, W]), got {len(inputs)}", 400,
                           "invalid_request")
    inp = inputs[0]
    if any(d < 0 for d in inp.shape):
        raise ServiceError(f"input '{inp.name}': negative dimension in shape {inp.shape}", 422,
                           "invalid_tensor")
    if inp.name == IMAGE_INPUT:
        _expect_datatype(inp, "BYTES")
        return await dp.classify_images(loaded, image_blobs(inp, dp))
    if inp.name == TENSOR_INPUT:
        _expect_datatype(inp, "FP32")
        return await dp.classify_tensor(loaded, image_tensor(inp, loaded, dp))
    raise ServiceError(f"unknown input '{inp.name}'; inputs: '{IMAGE_INPUT}' (BYTES) or "
                       f"'{TENSOR_INPUT}' (FP32)", 400, "invalid_request")


def _expect_datatype(inp: InputTensor, want: str) -> None:
    if inp.datatype.upper() != want:
        raise ServiceError(f"input '{inp.name}' must have datatype {want}, got {inp.datatype}",
                           422, "invalid_tensor")


def image_blobs(inp: InputTensor, dp: DataPlane) -> list[bytes]:
    """BYTES [N] (or [N, 1]): one encoded image file per element."""
    shape = inp.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise ServiceError(f"input '{IMAGE_INPUT}' must have shape [N] (one encoded image per "
                           f"element), got {shape}", 422, "invalid_tensor")
    n = shape[0]
    dp.check_count(n)
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


def image_tensor(inp: InputTensor, loaded: Loaded, dp: DataPlane) -> np.ndarray:
    c, h, w = loaded.input_shape
    shape = inp.shape
    if len(shape) != 4:
        raise ServiceError(f"input '{TENSOR_INPUT}' must have shape [N, {c}, {h}, {w}], got "
                           f"{shape}", 422, "invalid_tensor")
    dp.check_count(shape[0])
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
    return arr.reshape(shape)


# ---------------------------------------------------------------- inputs


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


# ---------------------------------------------------------------- statistics


class ModelStats:
    """Per-model inference statistics (the protocol's statistics extension), all transports
    together, per worker process: counts and cumulative nanoseconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_model: dict[tuple[str, str], dict[str, int]] = {}

    def _entry(self, loaded: Loaded) -> dict[str, int]:
        key = (loaded.model_name, loaded.bank_id)
        entry = self._by_model.get(key)
        if entry is None:
            entry = self._by_model[key] = {"inference_count": 0, "success_count": 0,
                                           "success_ns": 0, "fail_count": 0, "fail_ns": 0,
                                           "last_inference": 0}
        return entry

    def success(self, loaded: Loaded, n: int, ns: int) -> None:
        with self._lock:
            e = self._entry(loaded)
            e["inference_count"] += n
            e["success_count"] += 1
            e["success_ns"] += ns
            e["last_inference"] = int(time.time() * 1000)

    def failure(self, loaded: Loaded, ns: int) -> None:
        with self._lock:
            e = self._entry(loaded)
            e["fail_count"] += 1
            e["fail_ns"] += ns

    def report(self, loaded: Loaded) -> dict[str, Any]:
        with self._lock:
            e = dict(self._entry(loaded))
        return {"model_stats": [{
            "name": loaded.model_name, "version": loaded.bank_id,
            "last_inference": e["last_inference"], "inference_count": e["inference_count"],
            "inference_stats": {
                "success": {"count": e["success_count"], "ns": e["success_ns"]},
                "fail": {"count": e["fail_count"], "ns": e["fail_ns"]},
            },
        }]}
