"""Open Inference Protocol v2 (KServe / Triton REST): health, metadata, infer.

One model is served: its name is ``CONCEPTGUARD_MODEL_NAME`` (default: the bank's name)
and its single version is the bank id. Errors answer ``{"error": "<message>"}``.

The two infer paths are hot routes (:data:`HOT_ROUTES`): the middleware answers them with
:func:`infer_asgi`, a plain ASGI handler; the framework's routes of the same paths run the
same :func:`infer_response` and give the OpenAPI document.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from service import __version__, v2_binary
from service.codecs import (
    IMAGE_INPUT,
    OUTPUTS,
    TENSOR_INPUT,
    issue_receipts,
    requested_outputs,
)
from service.dataplane import DataPlane
from service.middleware import JSON_CHECKED_KEY, HotRoute, request_id
from service.oip import EXTENSIONS, ModelStats, model_metadata, platform, resolve_model
from service.oip import infer as infer_tensors
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

__all__ = ["HOT_ROUTES", "IMAGE_INPUT", "OUTPUTS", "TENSOR_INPUT", "model_metadata",
           "platform", "router"]

router = APIRouter(tags=["v2 (Open Inference Protocol)"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": V2ErrorResponse}, 404: {"model": V2ErrorResponse},
    413: {"model": V2ErrorResponse}, 415: {"model": V2ErrorResponse},
    422: {"model": V2ErrorResponse}, 503: {"model": V2ErrorResponse},
}
# the body is read by service.v2_binary (JSON with or without binary tensor data), so the
# OpenAPI request body is declared here
def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its local ``$defs`` references replaced by the definitions (an
    inline request body in OpenAPI cannot resolve ``#/$defs/...``)."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline_refs(InferenceRequest.model_json_schema())},
    "application/octet-stream": {"schema": {
        "type": "string", "format": "binary",
        "description": "binary tensor data extension: a JSON header of "
                       "Inference-Header-Content-Length bytes, then the tensors' bytes"}}}}}


def _state(request: Request) -> RuntimeState:
    return request.app.state.runtime_state


def _dataplane(request: Request) -> DataPlane:
    return request.app.state.dataplane


def model_stats(request: Request) -> ModelStats:
    """The app's per-model statistics (shared with the gRPC server)."""
    stats = getattr(request.app.state, "v2_stats", None)
    if stats is None:
        stats = request.app.state.v2_stats = ModelStats()
    return stats


def _model(request: Request, name: str, version: str | None = None) -> Loaded:
    return resolve_model(_state(request).require(), name, version)


# ---------------------------------------------------------------- health and metadata


# before /v2/models/{name}, which would take "stats" for a model name
@router.get("/v2/models/stats", summary="Inference statistics of every model (this worker)")
async def all_stats(request: Request) -> JSONResponse:
    return JSONResponse(model_stats(request).report(_state(request).require()))


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> JSONResponse:
    return JSONResponse({"name": "conceptguard", "version": __version__,
                         "extensions": EXTENSIONS})


@router.get("/v2/health/live", response_model=LiveResponse, summary="Liveness")
async def live() -> JSONResponse:
    return JSONResponse({"live": True})


@router.get("/v2/health/ready", response_model=ReadyResponse,
            responses={503: {"model": ReadyResponse}}, summary="Readiness (a bank is loaded)")
async def ready(request: Request) -> JSONResponse:
    state: RuntimeState | None = getattr(request.app.state, "runtime_state", None)
    ok = state is not None and state.ready  # loaded and warmed
    if ok:
        return JSONResponse({"ready": True})
    settings = getattr(request.app.state, "settings", None)
    retry = settings.retry_after_s if settings is not None else 1
    return JSONResponse({"ready": False}, status_code=503,
                        headers={"Retry-After": str(retry)})


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
             summary="Inference (Open Inference Protocol)", openapi_extra=_INFER_BODY)
async def infer(request: Request, name: str) -> Response:
    """One input: ``image`` (BYTES, shape [N], encoded image files: base64 strings in JSON,
    raw bytes as binary data) or ``input`` (FP32, shape [N, C, H, W], values in [0, 1], flat
    or nested data, or binary data). ``outputs`` selects outputs by name (default: all).
    The body is JSON whatever its Content-Type; the binary tensor data extension applies
    when ``Inference-Header-Content-Length`` is set (see docs/service.md)."""
    return await infer_response(request, name)


@router.post("/v2/models/{name}/versions/{version}/infer", response_model=InferenceResponse,
             responses=_ERRORS, summary="Inference (one version)", openapi_extra=_INFER_BODY)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await infer_response(request, name, version)


async def infer_response(request: Request, name: str, version: str | None = None
                         ) -> Response:
    """Resolve the model from the path -> read body -> decode, batch run (runtime +
    scores) -> encode (admitted by the middleware)."""
    loaded = _model(request, name, version)
    settings = request.app.state.settings
    req, tensors = v2_binary.parse_request(await request.body(), request.headers,
                                           settings.max_json_depth,
                                           guarded=bool(request.scope.get(JSON_CHECKED_KEY)))
    plan = v2_binary.output_plan(req)
    requested_outputs([name for name, _ in plan])
    scores = await infer_tensors(_dataplane(request), loaded, tensors, model_stats(request))
    k = settings.reason_concepts
    rid = request_id(request.scope)
    receipts = issue_receipts(request.app.state.feedback_book.key, rid, loaded.bank_id, scores)
    return v2_binary.rest_response(req, plan, loaded, scores, k,
                                   parameters={"request_id": rid,
                                               "receipts": ",".join(receipts)})


async def infer_asgi(scope: Scope, receive: Receive, send: Send,
                     params: dict[str, str]) -> None:
    """The hot routes' handler (see the module docstring)."""
    response = await infer_response(Request(scope, receive), params["name"],
                                    params.get("version"))
    await response(scope, receive, send)


HOT_ROUTES = (
    HotRoute(re.compile(r"/v2/models/(?P<name>[^/]+)/infer"), "/v2/models/{name}/infer",
             infer_asgi),
    HotRoute(re.compile(r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/infer"),
             "/v2/models/{name}/versions/{version}/infer", infer_asgi),
)


# ---------------------------------------------------------------- statistics


@router.get("/v2/models/{name}/stats", responses=_ERRORS,
            summary="Inference statistics (this worker process)")
async def stats(request: Request, name: str) -> JSONResponse:
    return JSONResponse(model_stats(request).report(_model(request, name)))


@router.get("/v2/models/{name}/versions/{version}/stats", responses=_ERRORS,
            summary="Inference statistics of one version (this worker process)")
async def stats_version(request: Request, name: str, version: str) -> JSONResponse:
    return JSONResponse(model_stats(request).report(_model(request, name, version)))
