"""The bank being served, swapped atomically on reload.

A :class:`Loaded` bundles everything one bank needs at serving time (bank, runtime,
per-bank metric children, the lazily loaded classifier head of the sidecar path); it is
immutable once built (:func:`service.bank_loader.load`). :class:`RuntimeState` holds the
current one; a reload loads the new bank beside it and replaces the reference in one
assignment, so a request holds either the old or the new bundle for its whole life.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import numpy as np

from conceptguard.bank import Bank, BankError, Manifest
from conceptguard.projection import project_features
from service.bank_loader import bank_info, open_bank
from service.bank_paths import BankPathError, confine, relative_message
from service.bank_summary import (
    bank_summary,
    expected_rejection_rate,
    json_safe,
    runtime_graph,
)
from service.batch_metrics import ModelMetrics
from service.errors import NotReady
from service.operating import publish_threshold, retire_model, with_operating_point
from service.settings import Settings
from service.sidecar_head import classifier_module, onnx_head_weights

if TYPE_CHECKING:  # the runtimes import torch / onnxruntime: load them at startup only
    from conceptguard.runtime import Runtime

log = logging.getLogger("conceptguard.service")


@dataclass(frozen=True, eq=False)
class Loaded:
    """One bank ready to serve."""

    bank: Bank
    runtime: Runtime
    model_name: str
    metrics: ModelMetrics
    # the serve-time operating point in use (service.operating), None: the bank's threshold
    operating_point: dict[str, Any] | None = None
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    _head_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # The bank's constants the request path reads are cached on first use
    # (``cached_property`` writes the instance's ``__dict__``, which a frozen dataclass
    # allows): afterwards a request reads a plain attribute and runs no code of this module.
    @cached_property
    def manifest(self) -> Manifest:
        return self.bank.manifest

    @cached_property
    def bank_id(self) -> str:
        return self.bank.manifest.bank_id

    @cached_property
    def classes(self) -> list[str]:
        return self.bank.manifest.classes

    @cached_property
    def concept_names(self) -> list[str]:
        return self.bank.manifest.concept_names

    @cached_property
    def input_shape(self) -> tuple[int, int, int]:
        p = self.bank.manifest.preprocessing
        return (p.channels, p.input_size, p.input_size)

    @property
    def feature_dim(self) -> int:
        return self.bank.manifest.dims.features

    @property
    def num_classes(self) -> int:
        return self.bank.manifest.dims.classes

    @cached_property
    def bank_reference(self) -> dict[str, Any]:
        """The ``bank`` object of every answer (shared by the answers: not to be mutated)."""
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
            if "onnx_head_weights" not in self._cache:
                self._cache["onnx_head_weights"] = onnx_head_weights(self)
        linear = self._cache["onnx_head_weights"]
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


def load(path: Path, settings: Settings) -> Loaded:
    """Load and validate a bank, start its runtime and check it end to end (blocking).
    Every failure is a :class:`BankError`."""
    bank, runtime = open_bank(path, settings)
    m = bank.manifest
    name = settings.model_name or m.name
    provider = getattr(runtime, "provider", runtime.device)
    info = {**bank_info(bank), "backend": runtime.name, "device": runtime.device,
            "provider": provider}
    metrics = ModelMetrics(name, m.classes, m.concept_names, info,
                           expected_rejection_rate=expected_rejection_rate(m.evaluation))
    log.info("loaded bank %s (%s) from %s: backend %s, device %s, provider %s (asked: %s), "
             "graph %s", m.bank_id, name, path, runtime.name, runtime.device, provider,
             settings.device, runtime_graph(runtime))
    return Loaded(bank=bank, runtime=runtime, model_name=name, metrics=metrics)


class RuntimeState:
    """Holds the current :class:`Loaded`; reloads build beside it and swap atomically."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root: Path = settings.root
        self.path: Path = Path(os.path.realpath(settings.bank))
        self.bank_ref: str = (self.path.relative_to(self.root).as_posix()
                              if self.path.is_relative_to(self.root) else self.path.name)
        self._current: Loaded | None = None
        self._reload_lock = asyncio.Lock()
        self._warmed = False
        # the bank a request may use now (current and warmed), else None: the hot route
        # reads this attribute; :meth:`require` says why there is none
        self.serving: Loaded | None = None
        # the operating point every bank this worker loads is served at (None: the bank's)
        self.operating_target = settings.operating_target

    @property
    def warmed(self) -> bool:
        return self._warmed

    @warmed.setter
    def warmed(self, value: bool) -> None:
        self._warmed = value
        self.serving = self._current if value else None

    @property
    def ready(self) -> bool:
        return self._current is not None and self.warmed

    @property
    def current(self) -> Loaded | None:
        return self._current

    def require(self) -> Loaded:
        loaded = self._current
        if loaded is None or not self.warmed:
            raise NotReady("the bank is still loading; retry shortly")
        return loaded

    async def start(self) -> Loaded:
        loaded = await anyio.to_thread.run_sync(load, self.path, self.settings)
        loaded = self._at_operating_point(loaded, self.operating_target)
        self._swap(loaded)
        return loaded

    @staticmethod
    def _at_operating_point(loaded: Loaded, target: Any) -> Loaded:
        """``loaded`` at ``target`` (see :mod:`service.operating`); BankError when the bank
        has no curve or the target is unreachable on it."""
        if target is None:
            return loaded
        try:
            return with_operating_point(loaded, target)
        except ValueError as exc:
            raise BankError(f"CONCEPTGUARD_OPERATING_POINT={target.target}:{target.value:g}: "
                            f"{exc}") from exc

    async def set_operating_point(self, target: Any) -> Loaded:
        """Serve the current bank at ``target`` (an ``OperatingTarget``; None: the bank's own
        threshold), swapped in atomically; ValueError (no curve, unreachable) leaves the
        current one serving."""
        async with self._reload_lock:
            current = self.require()
            new = with_operating_point(current, target)
            self.operating_target = target
            self._swap(new)
            return new

    async def reload(self, path: str | None = None) -> tuple[Loaded, Loaded | None]:
        """Load ``path`` (relative to the banks root; default: the current bank) and swap
        it in; returns (new, old). On any error the current bank stays and
        :class:`BankError` is raised, its message relative to the banks root."""
        async with self._reload_lock:
            if path is None:
                target, ref = self.path, self.bank_ref
            else:
                target, ref = confine(self.root, path)
            try:
                new = await anyio.to_thread.run_sync(load, target, self.settings)
                new = self._at_operating_point(new, self.operating_target)
            except BankPathError:
                raise
            except BankError as exc:
                raise BankError(relative_message(str(exc), self.root)) from exc
            old = self._current
            self._swap(new)
            self.path, self.bank_ref = target, ref
            return new, old

    def _swap(self, new: Loaded) -> None:
        old = self._current
        self._current = new  # the atomic step
        if self._warmed:
            self.serving = new
        if old is not None and (old.metrics.model, old.metrics.info) != (new.metrics.model,
                                                                         new.metrics.info):
            old.metrics.deactivate()
        if old is not None and old.model_name != new.model_name:
            retire_model(old.model_name)  # its threshold is not in use any more
        new.metrics.activate()
        publish_threshold(new)

    def stop(self) -> None:
        loaded, self._current, self.serving = self._current, None, None
        if loaded is not None:
            loaded.metrics.deactivate()
