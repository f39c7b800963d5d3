"""REST v2 bodies: JSON, with or without the binary tensor data extension, both ways
(:func:`parse_request`, :func:`output_plan`, :func:`rest_response`); the values inside
are decoded and encoded by :mod:`service.codecs`.

A request body is JSON, whatever its ``Content-Type`` (none, ``application/json`` or
``application/octet-stream``). With an ``Inference-Header-Content-Length: L`` header, the
first L bytes are the JSON header and the rest is binary tensor data: each input whose
``parameters.binary_data_size`` is S takes the next S bytes, in input order (BYTES elements
as 4-byte little-endian length + raw bytes, e.g. a PNG file as is; FP32 as little-endian
floats). A response carries an output as binary data when the request asks for it
(``parameters.binary_data_output`` for all outputs, an output's ``parameters.binary_data``
for that one); it then has the same header and ``Content-Type: application/octet-stream``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import Response
from pydantic import ValidationError

from conceptguard.scoring import Scores
from service.codecs import (
    OUTPUTS,
    InputTensor,
    check_finite,
    json_bytes,
    json_values,
    output_array,
    parse_json,
    raw_bytes,
)
from service.errors import ServiceError, invalid_request
from service.runtime_state import Loaded
from service.schemas import InferenceRequest

HEADER_LENGTH = "inference-header-content-length"
# the content types of a v2 body: JSON, or JSON + binary tensor data
_BODY_TYPES = frozenset({"application/json", "application/octet-stream"})


def parse_request(body: bytes, headers: Mapping[str, str], max_depth: int, *,
                  guarded: bool = False) -> tuple[InferenceRequest, list[InputTensor]]:
    """The request and its input tensors from a v2 body: JSON, or a JSON header followed by
    binary tensor data (``Inference-Header-Content-Length``). The JSON part goes through
    :func:`service.codecs.parse_json` (its guard skipped when ``guarded``: the middleware
    ran it on this part)."""
    json_part, binary = body, b""
    declared = headers.get(HEADER_LENGTH)
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise ServiceError(f"Inference-Header-Content-Length {declared!r} must be a byte "
                               f"count within the {len(body)}-byte body", 400,
                               "invalid_request")
        json_part, binary = body[:n], body[n:]
    obj = parse_json(json_part, max_depth, guarded=guarded)  # Content-Encoding: the middleware
    try:
        req = InferenceRequest.model_validate(obj)
    except ValidationError as exc:
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype not in _BODY_TYPES and not ctype.endswith("+json"):
            raise ServiceError(f"unsupported content type {ctype!r}: send application/json "
                               "(or application/octet-stream with binary tensor data)", 415,
                               "unsupported_media_type") from exc
        raise invalid_request(exc.errors()) from exc  # 422, binary data included
    tensors: list[InputTensor] = []
    offset = 0
    for inp in req.inputs:
        size = (inp.parameters or {}).get("binary_data_size")
        if size is None:
            if inp.data is None:
                raise ServiceError(f"input '{inp.name}' has neither data nor "
                                   "parameters.binary_data_size", 422, "invalid_request")
            tensors.append(InputTensor(inp.name, inp.datatype, inp.shape, data=inp.data))
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ServiceError(f"input '{inp.name}': binary_data_size must be a non-negative "
                               f"integer, got {size!r}", 400, "invalid_request")
        if offset + size > len(binary):
            raise ServiceError(f"input '{inp.name}': binary_data_size {size} runs past the "
                               f"{len(binary)} bytes of binary data (is "
                               "Inference-Header-Content-Length set?)", 400, "invalid_request")
        tensors.append(InputTensor(inp.name, inp.datatype, inp.shape,
                                   raw=binary[offset:offset + size]))
        offset += size
    if offset != len(binary):
        raise ServiceError(f"{len(binary) - offset} bytes of binary data belong to no input",
                           400, "invalid_request")
    return req, tensors


def output_plan(req: InferenceRequest) -> list[tuple[str, bool]]:
    """``(name, as_binary)`` per output asked for (all outputs when none is named)."""
    default = _flag((req.parameters or {}).get("binary_data_output"), "binary_data_output")
    if not req.outputs:
        return [(name, default) for name in OUTPUTS]
    plan = []
    for out in req.outputs:
        params = out.parameters or {}
        if params.get("classification"):
            raise ServiceError("the classification extension is not supported; ask for the "
                               "'probabilities' or 'label' output", 400, "invalid_request")
        binary = params.get("binary_data")
        plan.append((out.name, default if binary is None else _flag(binary, "binary_data")))
    return plan


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ServiceError(f"parameter {name} must be a boolean, got {value!r}", 400,
                           "invalid_request")
    return value


def rest_response(req: InferenceRequest, plan: list[tuple[str, bool]], loaded: Loaded,
                  scores: Scores, reason_concepts: int = 3,
                  parameters: dict[str, Any] | None = None) -> Response:
    """The REST v2 response: JSON, or JSON header + binary data when an output asks for it
    (``plan``: :func:`output_plan`); ``parameters``: the response's (the request id and the
    feedback receipts)."""
    header: dict[str, Any] = {"model_name": loaded.model_name,
                              "model_version": loaded.bank_id}
    if req.id is not None:
        header["id"] = req.id
    if parameters:
        header["parameters"] = parameters
    outputs = []
    blobs = []
    for name, binary in plan:
        datatype, shape, values = output_array(name, loaded, scores, reason_concepts)
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = raw_bytes(datatype, values)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            if datatype == "FP32":  # JSON has no NaN: 422 as v1 (binary data carries it)
                check_finite(name, values)
            out["data"] = json_values(datatype, values)
        outputs.append(out)
    header["outputs"] = outputs
    head = json_bytes(header)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})
