"""One bank ready to serve: :class:`Loaded` bundles the bank, its runtime, its per-bank
metric children and the lazily loaded classifier head of the sidecar path.

It is immutable once built (:func:`service.bank_loader.load`);
:class:`service.runtime_state.RuntimeState` replaces the reference in one assignment, so a
request holds either the old or the new bundle for its whole life, never a mix.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from conceptguard.bank import Bank, Manifest
from conceptguard.projection import project_features
from service.bank_summary import bank_summary, json_safe
from service.batch_metrics import ModelMetrics
from service.sidecar_head import classifier_module, linear_head

if TYPE_CHECKING:  # the runtimes import torch / onnxruntime: load them at startup only
    from conceptguard.runtime import Runtime


@dataclass(frozen=True, eq=False)
class Loaded:
    """One bank ready to serve."""

    bank: Bank
    runtime: Runtime
    model_name: str
    metrics: ModelMetrics
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    _head_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def manifest(self) -> Manifest:
        return self.bank.manifest

    @property
    def bank_id(self) -> str:
        return self.bank.manifest.bank_id

    @property
    def classes(self) -> list[str]:
        return self.bank.manifest.classes

    @property
    def concept_names(self) -> list[str]:
        names = self._cache.get("concept_names")
        if names is None:  # built from the manifest's concepts once per bank, not per request
            names = self._cache["concept_names"] = self.bank.manifest.concept_names
        return names

    @property
    def input_shape(self) -> tuple[int, int, int]:
        p = self.bank.manifest.preprocessing
        return (p.channels, p.input_size, p.input_size)

    @property
    def feature_dim(self) -> int:
        return self.bank.manifest.dims.features

    @property
    def num_classes(self) -> int:
        return self.bank.manifest.dims.classes

    def bank_ref(self) -> dict[str, Any]:
        m = self.bank.manifest
        return {"id": m.bank_id, "name": m.name, "schema_version": m.schema_version}

    def summary(self, path: str) -> dict[str, Any]:
        """The manifest summary of ``GET /v1/bank`` (computed once)."""
        cached = self._cache.get(("summary", path))
        if cached is None:
            cached = json_safe(bank_summary(self, path))
            self._cache[("summary", path)] = cached
        return cached

    def concepts_from_features(self, features: np.ndarray) -> np.ndarray:
        """Standardised concept scores of ``features`` (float64 projection of the core)."""
        projection = self._cache.get("projection64")
        if projection is None:  # cast once per bank, not per request
            projection = {k: np.asarray(v, dtype=np.float64)
                          for k, v in self.bank.projection().items()}
            self._cache["projection64"] = projection
        return project_features(features, projection)

    def head_logits(self, features: np.ndarray) -> np.ndarray:
        """Logits from features with the classifier's head (loaded once, on first use).
        A linear head (the usual case) runs in numpy from the classifier file's
        ``head.weight``/``head.bias``, so the ONNX backend needs no torch for it."""
        with self._head_lock:
            if "linear_head" not in self._cache:
                self._cache["linear_head"] = linear_head(self)
        linear = self._cache["linear_head"]
        if linear is not None:
            weight, bias = linear
            return np.ascontiguousarray(features, dtype=np.float32) @ weight.T + bias
        import torch

        with self._head_lock:
            model = self._cache.get("head")
            if model is None:
                model = classifier_module(self)
                self._cache["head"] = model
        with torch.inference_mode():
            z = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
            return model.head_logits(z).float().numpy()
