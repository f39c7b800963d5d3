"""The served bank and its runtime, swapped atomically on reload.

A :class:`Loaded` bundles everything one bank needs at serving time (bank, runtime,
per-bank metric children, the lazily loaded classifier head for the sidecar path). It is
immutable once built; :class:`RuntimeState` replaces the reference in one assignment, so a
request holds either the old or the new bundle for its whole life, never a mix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import numpy as np

from conceptguard.bank import Bank, BankError, Manifest, load_bank, probe_images
from conceptguard.projection import project_features
from service.errors import NotReady
from service.metrics import ModelMetrics
from service.settings import Settings

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
        return self.bank.manifest.concept_names

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
            cached = _json_safe(bank_summary(self, path))
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
                self._cache["linear_head"] = _linear_head(self)
        linear = self._cache["linear_head"]
        if linear is not None:
            weight, bias = linear
            return np.ascontiguousarray(features, dtype=np.float32) @ weight.T + bias
        import torch

        with self._head_lock:
            model = self._cache.get("head")
            if model is None:
                model = _classifier_module(self)
                self._cache["head"] = model
        with torch.inference_mode():
            z = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
            return model.head_logits(z).float().numpy()


def _linear_head(loaded: Loaded) -> tuple[np.ndarray, np.ndarray] | None:
    """``(weight K x D, bias K)`` when the head is one linear layer, on the ONNX backend
    (the torch backend keeps using its own module)."""
    if loaded.runtime.name.startswith("torch"):
        return None
    from safetensors import safe_open

    with safe_open(str(loaded.bank.classifier_path), framework="numpy") as f:
        keys = {k for k in f.keys() if k.startswith("head.")}  # noqa: SIM118
        if keys != {"head.weight", "head.bias"}:
            return None
        weight, bias = f.get_tensor("head.weight"), f.get_tensor("head.bias")
    k, d = loaded.num_classes, loaded.feature_dim
    if weight.shape != (k, d) or bias.shape != (k,):
        return None
    return weight.astype(np.float32), bias.astype(np.float32)


def _classifier_module(loaded: Loaded) -> Any:
    runtime: Any = loaded.runtime
    if runtime.name.startswith("torch") and runtime.device == "cpu":
        return runtime.module.classifier  # the torch runtime's own classifier
    return _load_classifier(loaded.bank.classifier_path)


def _load_classifier(path: Path) -> Any:
    from conceptguard.classifier.io import load_classifier

    return load_classifier(path)[0].eval()


def bank_summary(loaded: Loaded, path: str) -> dict[str, Any]:
    m = loaded.bank.manifest
    vlm = {"id": m.vlm.get("id"), "zero_shot_accuracy": m.vlm.get("zero_shot_accuracy")}
    spec = m.vlm.get("spec")
    if isinstance(spec, dict):
        vlm.update({"backend": spec.get("backend"), "model": spec.get("model")})
    if "note" in m.vlm:
        vlm["note"] = m.vlm["note"]
    return {
        "id": m.bank_id, "name": m.name, "model_name": loaded.model_name,
        "created_at": m.created_at, "schema_version": m.schema_version, "path": str(path),
        "classes": m.classes, "concepts": m.concept_names, "vlm": vlm,
        "classifier": {"hash": m.classifier.hash, "arch": m.classifier.spec.get("arch"),
                       "feature_dim": m.classifier.feature_dim,
                       "test_accuracy": m.classifier.test_accuracy},
        "threshold": m.threshold,
        "evaluation": {**m.evaluation, **_report_headline(loaded.bank.path)},
        "runtime": {"backend": loaded.runtime.name, "device": loaded.runtime.device,
                    "provider": getattr(loaded.runtime, "provider", loaded.runtime.device),
                    "graph": runtime_graph(loaded.runtime)},
    }


def _report_headline(bank_path: Path) -> dict[str, Any]:
    """Detection figures from ``report/metrics.json`` when the bank has one."""
    try:
        report = json.loads((bank_path / "report" / "metrics.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(report, dict):
        return {}

    def aurocs(section: Any) -> dict[str, float]:
        if not isinstance(section, dict):
            return {}
        return {k: v["auroc"] for k, v in section.items()
                if isinstance(v, dict) and _finite_number(v.get("auroc"))}

    out: dict[str, Any] = {}
    if mis := aurocs(report.get("misclassification")):
        out["misclassification_auroc"] = mis
    adversarial = report.get("adversarial")
    if isinstance(adversarial, dict):
        adv = {name: aurocs(sec) for name, sec in adversarial.items() if aurocs(sec)}
        if adv:
            out["adversarial_auroc"] = adv
    mixed = report.get("mixed")
    if isinstance(mixed, dict):
        risks = {k: v["risk_at_90_coverage"] for k, v in mixed.items()
                 if isinstance(v, dict) and _finite_number(v.get("risk_at_90_coverage"))}
        if risks:
            out["mixed_risk_at_90_coverage"] = risks
    return out


def _json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats (a manifest may hold NaN) become null."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _finite_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and np.isfinite(value))


def make_runtime(bank: Bank, settings: Settings) -> Runtime:
    if settings.backend == "onnx":
        from conceptguard.runtime import OnnxRuntime

        # the fused graph when the bank has one: one call per batch gives every score
        path = bank.fused_onnx_path or bank.onnx_path
        return OnnxRuntime(path, device=settings.device, threads=settings.threads)
    try:
        import torch
    except ImportError as exc:  # the serving install has no torch
        raise RuntimeError("the torch backend needs the 'torch' extra "
                           "(pip install 'conceptguard[torch]'); the serving install has "
                           "ONNX Runtime only") from exc

    from conceptguard.classifier.io import load_classifier
    from conceptguard.export import MonitoredClassifier
    from conceptguard.runtime import TorchRuntime

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    module = MonitoredClassifier(load_classifier(bank.classifier_path)[0], bank.projection())
    return TorchRuntime(module, device=settings.device)


def runtime_graph(runtime: Runtime) -> str:
    """``fused`` when the scores come out of the runtime's graph (``monitor.onnx``),
    ``classifier`` when numpy :func:`conceptguard.scoring.score` computes them."""
    return getattr(runtime, "graph", "classifier")


def bank_info(bank: Bank) -> dict[str, str]:
    m = bank.manifest
    return {"bank_id": m.bank_id, "vlm": str(m.vlm.get("id", "unknown")),
            "classifier_hash": m.classifier.hash, "schema_version": str(m.schema_version)}


def load(path: Path, settings: Settings) -> Loaded:
    """Load and validate a bank, start its runtime and check it end to end (blocking).
    Every failure is a :class:`BankError`."""
    try:
        bank = load_bank(path, expected_classifier_hash=settings.expected_classifier_hash)
    except BankError:
        raise
    except Exception as exc:  # whatever else a malformed bank makes the loader raise
        raise BankError(f"bank {path} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    try:
        runtime = make_runtime(bank, settings)
    except Exception as exc:
        raise BankError(f"cannot start the {settings.backend} runtime on {path}: {exc}") from exc
    _smoke_test(bank, runtime)
    m = bank.manifest
    name = settings.model_name or m.name
    provider = getattr(runtime, "provider", runtime.device)
    info = {**bank_info(bank), "backend": runtime.name, "device": runtime.device,
            "provider": provider}
    metrics = ModelMetrics(name, m.classes, m.concept_names, info)
    log.info("loaded bank %s (%s) from %s: backend %s, device %s, provider %s (asked: %s), "
             "graph %s", m.bank_id, name, path, runtime.name, runtime.device, provider,
             settings.device, runtime_graph(runtime))
    return Loaded(bank=bank, runtime=runtime, model_name=name, metrics=metrics)


def _smoke_test(bank: Bank, runtime: Runtime) -> None:
    """A probe batch end to end (runtime, then the core's ``score``): output shapes must
    match the manifest and every output and score must be finite; on the fused graph its
    scores must also agree with ``score`` (a ``monitor.onnx`` exported from other tensors
    is refused)."""
    from conceptguard.scoring import graph_disagreement, score, scores_from_graph

    d = bank.manifest.dims
    p = bank.manifest.preprocessing
    x = probe_images(bank)
    n = len(x)
    try:
        out = runtime.run(x)
    except Exception as exc:
        raise BankError(f"the serving graph fails on a {p.channels}x{p.input_size}x"
                        f"{p.input_size} input: {exc}") from exc
    want = {"logits": (n, d.classes), "features": (n, d.features), "concepts": (n, d.concepts)}
    for name, shape in want.items():
        value = getattr(out, name)
        got = tuple(value.shape)
        if got != shape:
            raise BankError(f"the serving graph's {name} output has shape {got}, the manifest "
                            f"implies {shape}")
        if not np.isfinite(value).all():
            raise BankError(f"the serving graph's {name} output is not finite on the probe "
                            "batch")
    try:
        with np.errstate(all="ignore"):
            s = score(bank.monitor, out.logits, out.features, out.concepts)
    except Exception as exc:
        raise BankError(f"scoring the probe batch fails: {type(exc).__name__}: {exc}") from exc
    for name in ("trust", "p_misclassification", "p_anomaly", "p_adversarial",
                 "p_unfamiliar", "contributions"):
        value = np.asarray(getattr(s, name), dtype=np.float64)
        if not np.isfinite(value).all():
            raise BankError(f"scoring the probe batch gives non-finite {name}")
    if out.monitor is not None:
        try:
            problem = graph_disagreement(s, scores_from_graph(out.monitor,
                                                              bank.monitor.threshold))
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            raise BankError(f"the fused graph (monitor.onnx) disagrees with scoring on the "
                            f"probe batch: {problem}; re-export it with `conceptguard "
                            f"export-graph`")


NAME_MAX = 255  # bytes per path component on common file systems


class BankPathError(BankError):
    """A bank path is empty, malformed or outside the banks root."""


def confine(root: Path, raw: str | Path) -> tuple[Path, str]:
    """``raw`` (relative to ``root``, or absolute) -> (the real path, its id relative to
    ``root``). Refuses empty names, NUL bytes, over-long components and anything outside
    ``root`` (``..``, absolute paths elsewhere, symbolic links leading out) with one
    message that does not say whether the target exists."""
    text = str(raw)
    if not text.strip() or "\x00" in text:
        raise BankPathError("bank path must be a non-empty folder name under the banks root")
    for part in Path(text).parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise BankPathError(f"bank path has a component over {NAME_MAX} bytes")
    candidate = Path(text) if os.path.isabs(text) else root / text
    real = Path(os.path.realpath(candidate))
    if real != root and not real.is_relative_to(root):
        raise BankPathError(f"bank path {text!r} is not under the banks root")
    rel = real.relative_to(root).as_posix()
    return real, rel


def relative_message(message: str, root: Path) -> str:
    """A loader message with the banks root taken out of every path in it."""
    prefix = str(root).rstrip("/") + "/"
    return message.replace(prefix, "").replace(str(root), ".")


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
        self.warmed = False

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
        self._swap(loaded)
        return loaded

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
        if old is not None and (old.metrics.model, old.metrics.info) != (new.metrics.model,
                                                                         new.metrics.info):
            old.metrics.deactivate()
        new.metrics.activate()

    def stop(self) -> None:
        loaded, self._current = self._current, None
        if loaded is not None:
            loaded.metrics.deactivate()
