"""Helpers of the deploy-manifest schema tests (KServe, KubeRay)."""

from __future__ import annotations

import copy
from typing import Any


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
