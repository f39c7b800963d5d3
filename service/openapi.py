"""The OpenAPI schema states the limits the server enforces, for the bank being served.

FastAPI builds the schema from the pydantic models once; :func:`with_limits` adds what only
the running server knows (``CONCEPTGUARD_MAX_IMAGES_PER_REQUEST``, the bank's feature and
class counts, the served model name and version), so that a schema-driven client or fuzzer
never generates a request the server rejects, and documents every status it answers.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.runtime_state import Loaded
    from service.settings import Settings

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_V2_ERROR_REF = {"$ref": "#/components/schemas/V2ErrorResponse"}
# statuses every POST route may answer besides its own (JSON guard, admission, timeouts)
_COMMON = {"400": "malformed body (invalid or too deeply nested JSON)",
           "408": "the request body stalled (CONCEPTGUARD_BODY_TIMEOUT_S)",
           "413": "request body over CONCEPTGUARD_MAX_UPLOAD_BYTES",
           "415": "unsupported content type",
           "422": "wrong structure or values",
           "503": "not ready, queue full or shutting down; see Retry-After"}


def with_limits(base: dict[str, Any], settings: Settings | None,
                loaded: Loaded | None) -> dict[str, Any]:
    schema = copy.deepcopy(base)
    paths = schema.get("paths", {})
    for path, ops in paths.items():
        for method, op in ops.items():
            if method != "post":
                continue
            responses = op.setdefault("responses", {})
            ref = _V2_ERROR_REF if path.startswith("/v2") else _ERROR_REF
            for code, text in _COMMON.items():
                responses.setdefault(code, {"description": text, "content": {
                    "application/json": {"schema": ref}}})
    if settings is None:
        return schema
    n = settings.max_images_per_request
    comps = schema.get("components", {}).get("schemas", {})
    classify = (paths.get("/v1/classify", {}).get("post", {}).get("requestBody", {})
                .get("content", {}).get("application/json", {}).get("schema"))
    if isinstance(classify, dict):
        images = classify.get("properties", {}).get("images", {})
        for option in images.get("anyOf", [images]):
            if option.get("type") == "array":
                option["maxItems"] = n
    monitor = comps.get("MonitorRequest", {}).get("properties", {})
    dims = {"features": loaded.feature_dim if loaded else None,
            "logits": loaded.num_classes if loaded else None}
    for name, width in dims.items():
        field = monitor.get(name, {})
        for option in field.get("anyOf", [field]):
            if option.get("type") != "array":
                continue
            option["maxItems"] = n
            if width is not None:
                option["items"]["minItems"] = option["items"]["maxItems"] = width
    if loaded is not None:
        for path, ops in paths.items():
            for op in ops.values():
                for param in op.get("parameters", []):
                    if param.get("in") != "path" or not path.startswith("/v2/models/"):
                        continue
                    if param.get("name") == "name":
                        param["schema"] = {"type": "string", "enum": [loaded.model_name]}
                    elif param.get("name") == "version":
                        param["schema"] = {"type": "string", "enum": [loaded.bank_id]}
    return schema
