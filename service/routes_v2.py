"""Open Inference Protocol v2 (KServe / Triton REST): health, metadata, infer.

One model is served: its name is ``CONCEPTGUARD_MODEL_NAME`` (default: the bank's name)
and its single version is the bank id. Errors answer ``{"error": "<message>"}``.
"""

from __future__ import annotations

import importlib.metadata
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.dataplane import DataPlane, Results, ServiceError, as_float_array
from service.routes_v1 import decode_base64
from service.runtime_state import Loaded, RuntimeState
from service.schemas import (
    InferenceRequest,
    InferenceResponse,
    LiveResponse,
    ModelMetadata,
    ModelReadyResponse,
    ReadyResponse,
    ServerMetadata,
    V2ErrorResponse,
)

router = APIRouter(tags=["v2 (Open Inference Protocol)"])


def _package_version() -> str:
    try:
        return importlib.metadata.version("conceptguard")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _package_version()

IMAGE_INPUT = "image"  # BYTES [N]: encoded image files, base64 in JSON
TENSOR_INPUT = "input"  # FP32 [N, C, H, W] in [0, 1]
OUTPUTS = ("probabilities", "label", "class_index", "trust", "reject", "p_misclassification",
           "p_adversarial")
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": V2ErrorResponse}, 404: {"model": V2ErrorResponse},
    413: {"model": V2ErrorResponse}, 422: {"model": V2ErrorResponse},
    503: {"model": V2ErrorResponse},
}


def _state(request: Request) -> RuntimeState:
    return request.app.state.runtime_state


def _dataplane(request: Request) -> DataPlane:
    return request.app.state.dataplane


def _model(request: Request, name: str, version: str | None = None) -> Loaded:
    loaded = _state(request).require()
    if name != loaded.model_name:
        raise ServiceError(f"unknown model '{name}'; this server serves '{loaded.model_name}'",
                           404, "unknown_model")
    if version is not None and version != loaded.bank_id:
        raise ServiceError(f"model '{name}' has no version '{version}'; the version served is "
                           f"'{loaded.bank_id}'", 404, "unknown_version")
    return loaded


def platform(loaded: Loaded) -> str:
    return "onnxruntime_onnx" if loaded.runtime.name == "onnx" else "pytorch_torch"


def model_metadata(loaded: Loaded) -> dict[str, Any]:
    c, h, w = loaded.input_shape
    k = loaded.num_classes
    scalar = [-1]
    return {
        "name": loaded.model_name,
        "versions": [loaded.bank_id],
        "platform": platform(loaded),
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": scalar},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, c, h, w]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "label", "datatype": "BYTES", "shape": scalar},
            {"name": "class_index", "datatype": "INT64", "shape": scalar},
            {"name": "trust", "datatype": "FP32", "shape": scalar},
            {"name": "reject", "datatype": "BOOL", "shape": scalar},
            {"name": "p_misclassification", "datatype": "FP32", "shape": scalar},
            {"name": "p_adversarial", "datatype": "FP32", "shape": scalar},
        ],
    }


# ---------------------------------------------------------------- health and metadata


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> JSONResponse:
    return JSONResponse({"name": "conceptguard", "version": __version__, "extensions": []})


@router.get("/v2/health/live", response_model=LiveResponse, summary="Liveness")
async def live() -> JSONResponse:
    return JSONResponse({"live": True})


@router.get("/v2/health/ready", response_model=ReadyResponse,
            responses={503: {"model": ReadyResponse}}, summary="Readiness (a bank is loaded)")
async def ready(request: Request) -> JSONResponse:
    state: RuntimeState | None = getattr(request.app.state, "runtime_state", None)
    ok = state is not None and state.ready  # loaded and warmed
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2/models/{name}", response_model=ModelMetadata, responses=_ERRORS,
            summary="Model metadata")
async def metadata(request: Request, name: str) -> JSONResponse:
    return JSONResponse(model_metadata(_model(request, name)))


@router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata,
            responses=_ERRORS, summary="Model metadata (one version)")
async def metadata_version(request: Request, name: str, version: str) -> JSONResponse:
    return JSONResponse(model_metadata(_model(request, name, version)))


@router.get("/v2/models/{name}/ready", response_model=ModelReadyResponse, responses=_ERRORS,
            summary="Model readiness")
async def model_ready(request: Request, name: str) -> JSONResponse:
    loaded = _model(request, name)
    return JSONResponse({"name": loaded.model_name, "ready": True})


@router.get("/v2/models/{name}/versions/{version}/ready", response_model=ModelReadyResponse,
            responses=_ERRORS, summary="Model readiness (one version)")
async def model_version_ready(request: Request, name: str, version: str) -> JSONResponse:
    loaded = _model(request, name, version)
    return JSONResponse({"name": loaded.model_name, "ready": True})


# ---------------------------------------------------------------- inference


@router.post("/v2/models/{name}/infer", response_model=InferenceResponse, responses=_ERRORS,
             summary="Inference (Open Inference Protocol)")
async def infer(request: Request, name: str, body: InferenceRequest) -> JSONResponse:
    """One input: ``image`` (BYTES, shape [N], base64-encoded image files) or ``input``
    (FP32, shape [N, C, H, W], values in [0, 1], flat or nested data). ``outputs`` selects
    outputs by name (default: all)."""
    return await _infer(request, _model(request, name), body)


@router.post("/v2/models/{name}/versions/{version}/infer", response_model=InferenceResponse,
             responses=_ERRORS, summary="Inference (one version)")
async def infer_version(request: Request, name: str, version: str,
                        body: InferenceRequest) -> JSONResponse:
    return await _infer(request, _model(request, name, version), body)


async def _infer(request: Request, loaded: Loaded, body: InferenceRequest) -> JSONResponse:
    names = _requested_outputs(body)
    if len(body.inputs) != 1:
        raise ServiceError(f"expected exactly one input ('{IMAGE_INPUT}' BYTES [N] or "
                           f"'{TENSOR_INPUT}' FP32 [N, C, H, W]), got {len(body.inputs)}", 400,
                           "invalid_request")
    inp = body.inputs[0]
    dp = _dataplane(request)
    if any(d < 0 for d in inp.shape):
        raise ServiceError(f"input '{inp.name}': negative dimension in shape {inp.shape}", 422,
                           "invalid_tensor")
    if inp.name == IMAGE_INPUT:
        _expect_datatype(inp.name, inp.datatype, "BYTES")
        results = await dp.classify_images(_image_bytes(inp.shape, inp.data, dp))
    elif inp.name == TENSOR_INPUT:
        _expect_datatype(inp.name, inp.datatype, "FP32")
        results = await dp.classify_tensor(_image_tensor(inp.shape, inp.data, loaded, dp))
    else:
        raise ServiceError(f"unknown input '{inp.name}'; inputs: '{IMAGE_INPUT}' (BYTES) or "
                           f"'{TENSOR_INPUT}' (FP32)", 400, "invalid_request")
    out: dict[str, Any] = {"model_name": results.loaded.model_name,
                           "model_version": results.loaded.bank_id}
    if body.id is not None:
        out["id"] = body.id
    out["outputs"] = [_output(name, results) for name in names]
    return JSONResponse(out)


def _requested_outputs(body: InferenceRequest) -> list[str]:
    if not body.outputs:
        return list(OUTPUTS)
    names = [o.name for o in body.outputs]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise ServiceError(f"unknown output(s) {unknown}; available: {list(OUTPUTS)}", 400,
                           "invalid_request")
    return names


def _expect_datatype(name: str, got: str, want: str) -> None:
    if got.upper() != want:
        raise ServiceError(f"input '{name}' must have datatype {want}, got {got}", 422,
                           "invalid_tensor")


def _image_bytes(shape: list[int], data: list[Any], dp: DataPlane) -> list[bytes]:
    if len(shape) == 2 and shape[1] == 1:
        data = [d[0] if isinstance(d, list) and len(d) == 1 else d for d in data]
    elif len(shape) != 1:
        raise ServiceError(f"input '{IMAGE_INPUT}' must have shape [N] (one encoded image per "
                           f"element), got {shape}", 422, "invalid_tensor")
    n = shape[0]
    if len(data) != n:
        raise ServiceError(f"input '{IMAGE_INPUT}': shape {shape} means {n} elements, data "
                           f"has {len(data)}", 422, "invalid_tensor")
    dp.check_count(n)
    blobs = []
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise ServiceError(f"input '{IMAGE_INPUT}' data[{i}] must be a base64 string", 422,
                               "invalid_tensor")
        blobs.append(decode_base64(item, f"input '{IMAGE_INPUT}' data[{i}]"))
    return blobs


def _image_tensor(shape: list[int], data: list[Any], loaded: Loaded, dp: DataPlane
                  ) -> np.ndarray:
    c, h, w = loaded.input_shape
    if len(shape) != 4:
        raise ServiceError(f"input '{TENSOR_INPUT}' must have shape [N, {c}, {h}, {w}], got "
                           f"{shape}", 422, "invalid_tensor")
    dp.check_count(shape[0])
    arr = as_float_array(data, f"input '{TENSOR_INPUT}' data")
    if arr.size != math.prod(shape):
        raise ServiceError(f"input '{TENSOR_INPUT}': shape {shape} means {math.prod(shape)} "
                           f"values, data has {arr.size}", 422, "invalid_tensor")
    return arr.reshape(shape)


def _output(name: str, r: Results) -> dict[str, Any]:
    n = len(r)
    if name == "probabilities":
        return {"name": name, "datatype": "FP32", "shape": [n, r.probabilities.shape[1]],
                "data": r.probabilities.ravel().tolist()}
    if name == "label":
        return {"name": name, "datatype": "BYTES", "shape": [n], "data": r.labels()}
    if name == "class_index":
        return {"name": name, "datatype": "INT64", "shape": [n], "data": r.predictions.tolist()}
    if name == "reject":
        return {"name": name, "datatype": "BOOL", "shape": [n], "data": r.reject.tolist()}
    array = {"trust": r.trust, "p_misclassification": r.p_misclassification,
             "p_adversarial": r.p_adversarial}[name]
    return {"name": name, "datatype": "FP32", "shape": [n], "data": array.tolist()}
