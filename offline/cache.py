"""Content-addressed cache of arrays (safetensors) for resumable stages.

A key is the stage name plus a JSON description of every input that determines the result;
changing any input changes the key, so stale entries are never reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from conceptguard.atomic import atomic_path


def cache_key(stage: str, inputs: dict[str, Any]) -> str:
    blob = json.dumps({"stage": stage, **inputs}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}"


class ArrayCache:
    def __init__(self, root: Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled
        self.hits: list[str] = []
        self.misses: list[str] = []

    def get_or_compute(self, stage: str, inputs: dict[str, Any],
                       compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        key = cache_key(stage, inputs)
        path = self.root / f"{key}.safetensors"
        if self.enabled and path.is_file():
            try:
                arrays = load_file(str(path))
                self.hits.append(key)
                return arrays
            except (SafetensorError, OSError):
                path.unlink(missing_ok=True)  # a damaged entry is recomputed
        arrays = compute()
        self.misses.append(key)
        if self.enabled:
            self._store(path, arrays)
        return arrays

    def _store(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        with atomic_path(path, mode=None) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
