"""Helpers of the deploy-manifest schema tests (KServe, KubeRay)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest


def errors(validator: Any, doc: dict[str, Any]) -> list[str]:
    """Every schema error of ``doc`` as ``path: message``."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def with_value(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``doc`` with the value at ``path`` (keys and list indices) replaced."""
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def k8s_validator(schema_path: Path) -> Any:
    """A JSON-schema validator of ``schema_path`` whose ``$ref``s to Kubernetes types resolve
    to the strict schemas kubernetes-validate ships (its newest Kubernetes version)."""
    kv = pytest.importorskip("kubernetes_validate")
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    root = Path(kv.__file__).parent / "kubernetes-json-schema"
    k8s = json.loads((root / f"v{kv.latest_version()}-local-strict" /
                      "_definitions.json").read_text())
    registry = Registry().with_resource(k8s["$id"], Resource.from_contents(k8s))
    schema = json.loads(schema_path.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=registry)
