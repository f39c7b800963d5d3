"""The v2 encoder (Open Inference Protocol): :class:`~conceptguard.scoring.Scores` of a
request -> output tensors, and their encodings: JSON values, the protocol's binary form
(the REST binary data extension and gRPC ``raw_output_contents``), the REST response."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse, Response

from conceptguard.scoring import Scores
from service.runtime_state import Loaded
from service.schemas import InferenceRequest

OUTPUT_DATATYPES = {"probabilities": "FP32", "label": "BYTES", "class_index": "INT64",
                    "trust": "FP32", "reject": "BOOL", "p_misclassification": "FP32",
                    "p_anomaly": "FP32", "p_adversarial": "FP32", "p_unfamiliar": "FP32"}
OUTPUTS = tuple(OUTPUT_DATATYPES)
_LITTLE = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "BOOL": "|b1"}


def output_array(name: str, loaded: Loaded, r: Scores) -> tuple[str, list[int], np.ndarray]:
    """``(datatype, shape, values)`` of one output; BYTES values are an object array of
    ``bytes`` (UTF-8 labels)."""
    n = len(r)
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


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def rest_response(req: InferenceRequest, plan: list[tuple[str, bool]], loaded: Loaded,
                  scores: Scores) -> Response:
    """The REST v2 response: JSON, or JSON header + binary data when an output asks for it
    (``plan``: :func:`service.v2_binary.output_plan`)."""
    header: dict[str, Any] = {"model_name": loaded.model_name,
                              "model_version": loaded.bank_id}
    if req.id is not None:
        header["id"] = req.id
    outputs = []
    blobs = []
    for name, binary in plan:
        datatype, shape, values = output_array(name, loaded, scores)
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = raw_bytes(datatype, values)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = json_values(datatype, values)
        outputs.append(out)
    header["outputs"] = outputs
    if not blobs:
        return JSONResponse(header)
    head = json.dumps(header, separators=(",", ":")).encode()
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})
