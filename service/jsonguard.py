"""Checks a JSON body must pass before any parser sees it."""

from __future__ import annotations

import re

import numpy as np

_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_problem(body: bytes, max_depth: int) -> str | None:
    """Why ``body`` must not reach a JSON parser (non-UTF-8, nested deeper than
    ``max_depth``), or None. Deep nesting would exhaust the parser's recursion."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the request body is not UTF-8 JSON: {exc.reason} at byte {exc.start}"
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return None
    structure = np.frombuffer(_STRINGS.sub(b"", body), dtype=np.uint8)
    step = ((structure == ord("[")) | (structure == ord("{"))).astype(np.int32) - (
        (structure == ord("]")) | (structure == ord("}"))).astype(np.int32)
    depth = int(np.cumsum(step).max()) if step.size else 0
    if depth > max_depth:
        return (f"the request JSON is nested {depth} levels deep; the limit is {max_depth} "
                "(CONCEPTGUARD_MAX_JSON_DEPTH)")
    return None
