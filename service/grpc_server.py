"""Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` and the standard
``grpc.health.v1.Health`` service, on ``CONCEPTGUARD_GRPC_PORT`` (default 8001).

The server runs in the same process and on the same event loop as the HTTP app: the app's
lifespan starts it after the bank and the data plane, so ``ModelInfer`` goes through the same
:class:`service.dataplane.DataPlane` (decoding, batcher, scoring) as REST, via
:func:`service.oip.infer`. With several uvicorn workers every worker binds the port
with ``SO_REUSEPORT`` (gRPC's default on Linux) and the kernel spreads connections.

Errors map to gRPC status codes (400/422 INVALID_ARGUMENT, 404 NOT_FOUND, 413
RESOURCE_EXHAUSTED, 503 UNAVAILABLE); ``conceptguard_requests`` counts gRPC calls under the
method's path with the HTTP-equivalent status, so the error-rate alerts cover both transports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from service import metrics
from service.codecs import InputTensor, output_array, raw_bytes, requested_outputs
from service.dataplane import DataPlane
from service.errors import ClientClosed, ServiceError, as_service_error
from service.oip import EXTENSIONS, ModelStats, model_metadata, resolve_model
from service.oip import infer as infer_tensors
from service.proto import grpc_service_pb2 as pb
from service.proto import grpc_service_pb2_grpc as pb_grpc
from service.runtime_state import RuntimeState
from service.settings import Settings

log = logging.getLogger("conceptguard.service")
SERVICE_NAME = "inference.GRPCInferenceService"
T = TypeVar("T")

_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
           413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
           422: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE}


def _contents_values(datatype: str, contents: pb.InferTensorContents) -> Any:
    if datatype.upper() == "BYTES":
        return list(contents.bytes_contents)
    if datatype.upper() in ("FP32", "FP16"):
        return np.asarray(contents.fp32_contents, dtype=np.float32)
    if datatype.upper() == "FP64":
        return np.asarray(contents.fp64_contents, dtype=np.float64)
    return list(contents.int64_contents) or list(contents.int_contents)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: RuntimeState, dataplane: DataPlane, stats: ModelStats,
                 version: str, reason_concepts: int = 3):
        self.state = state
        self.dataplane = dataplane
        self.stats = stats
        self.version = version
        self.reason_concepts = reason_concepts  # concepts per input in the reason outputs

    async def _call(self, method: str, context: grpc.aio.ServicerContext,
                    fn: Callable[[], Awaitable[T]]) -> T:
        start = time.perf_counter()
        status = 500
        try:
            result = await fn()
            status = 200
            return result
        except asyncio.CancelledError:  # the client cancelled or its deadline passed
            closed = ClientClosed()
            status = closed.status
            metrics.bad_request(closed.code)
            raise
        except Exception as exc:
            err = as_service_error(exc)
            if not isinstance(exc, ServiceError):
                log.exception("unhandled error in gRPC %s", method, exc_info=exc)
            status, code, message = err.status, err.code, err.message
        finally:
            metrics.observe_request(f"/{SERVICE_NAME}/{method}", status,
                                    time.perf_counter() - start)
        if 400 <= status < 500:
            metrics.bad_request(code)
        await context.abort(_STATUS.get(status, grpc.StatusCode.INTERNAL), message)
        raise AssertionError("unreachable")  # context.abort raises

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        async def run() -> pb.ModelReadyResponse:
            resolve_model(self.state.require(), request.name, request.version)
            return pb.ModelReadyResponse(ready=True)

        return await self._call("ModelReady", context, run)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="conceptguard", version=self.version,
                                         extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        async def run() -> pb.ModelMetadataResponse:
            meta = model_metadata(resolve_model(self.state.require(), request.name,
                                                request.version))
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]])

        return await self._call("ModelMetadata", context, run)

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        async def run() -> pb.ModelInferResponse:
            loaded = resolve_model(self.state.require(), request.model_name,
                                   request.model_version)
            raw = list(request.raw_input_contents)
            if raw and len(raw) != len(request.inputs):
                raise ServiceError(f"{len(raw)} raw_input_contents for {len(request.inputs)} "
                                   "inputs (one per input, in order)", 400, "invalid_request")
            inputs = []
            for i, t in enumerate(request.inputs):
                tensor = InputTensor(t.name, t.datatype, list(t.shape))
                if raw:
                    tensor.raw = raw[i]
                else:
                    tensor.data = _contents_values(t.datatype, t.contents)
                inputs.append(tensor)
            names = requested_outputs([o.name for o in request.outputs])
            scores = await infer_tensors(self.dataplane, loaded, inputs, self.stats)
            response = pb.ModelInferResponse(model_name=loaded.model_name,
                                             model_version=loaded.bank_id, id=request.id)
            for name in names:
                datatype, shape, values = output_array(name, loaded, scores,
                                                       self.reason_concepts)
                response.outputs.add(name=name, datatype=datatype, shape=shape)
                response.raw_output_contents.append(raw_bytes(datatype, values))
            return response

        return await self._call("ModelInfer", context, run)


class GrpcServer:
    """The gRPC server of one worker process (started and stopped by the app's lifespan)."""

    def __init__(self, settings: Settings, state: RuntimeState, dataplane: DataPlane,
                 stats: ModelStats, version: str):
        self.settings = settings
        self.address = f"{settings.grpc_host}:{settings.grpc_port}"
        limit = settings.max_upload_bytes + 64 * 1024  # the body limit, plus the envelope
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 1),
        ])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(state, dataplane, stats, version, settings.reason_concepts),
            self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    async def start(self) -> None:
        try:
            port = self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen for gRPC on {self.address} "
                               f"(CONCEPTGUARD_GRPC_PORT): {exc}") from exc
        if port == 0:
            raise RuntimeError(f"cannot listen for gRPC on {self.address} "
                               "(CONCEPTGUARD_GRPC_PORT)")
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC (Open Inference Protocol) listening on %s", self.address)

    async def stop(self, grace_s: float = 5.0) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)
