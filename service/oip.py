"""The Open Inference Protocol's model layer, shared by its transports (REST v2 JSON and
binary data, gRPC): model metadata, model resolution, inference and statistics.

The transports only move bytes: REST reads JSON values or the binary tensor data extension's
blobs, gRPC reads ``contents`` or ``raw_input_contents``; all of them build a
:class:`service.codecs.InputTensor` and call :func:`infer`, which decodes it with
:mod:`service.codecs` and runs it on :class:`service.dataplane.DataPlane`. The outputs are
encoded by :func:`service.codecs.output_array`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from conceptguard.scoring import Scores
from service.codecs import (
    IMAGE_INPUT,
    OUTPUT_DATATYPES,
    PER_CONCEPT_OUTPUTS,
    TENSOR_INPUT,
    InputTensor,
    expect_datatype,
    image_blobs,
    image_tensor,
)
from service.dataplane import DataPlane
from service.errors import ServiceError
from service.runtime_state import Loaded

# the protocol extensions served (GET /v2, gRPC ServerMetadata)
EXTENSIONS = ["binary_tensor_data", "statistics"]


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
    limit = dp.settings.max_images_per_request
    if inp.name == IMAGE_INPUT:
        expect_datatype(inp, "BYTES")
        return await dp.classify_images(loaded, image_blobs(inp, limit))
    if inp.name == TENSOR_INPUT:
        expect_datatype(inp, "FP32")
        return await dp.classify_tensor(loaded, image_tensor(inp, loaded, limit))
    raise ServiceError(f"unknown input '{inp.name}'; inputs: '{IMAGE_INPUT}' (BYTES) or "
                       f"'{TENSOR_INPUT}' (FP32)", 400, "invalid_request")


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
