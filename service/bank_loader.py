"""Opening a bank for serving: validate it, start its runtime (ONNX Runtime, or torch) and
run a probe batch end to end (:func:`open_bank`). Every failure is a
:class:`~conceptguard.bank.BankError` naming the problem."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from conceptguard.bank import Bank, BankError, load_bank, probe_images
from service.settings import Settings

log = logging.getLogger("conceptguard.service")

if TYPE_CHECKING:  # the runtimes import torch / onnxruntime: load them at startup only
    from conceptguard.runtime import Runtime


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
    if bank.fused_onnx_path is None:  # no fused graph: numpy score() after the runtime
        return TorchRuntime(module, device=settings.device)
    # the bank's monitor fuses (build-bank wrote and checked its graph): classifier and
    # monitor as one torch module, on the same device
    from conceptguard.monitor_graph import FusedMonitoredClassifier, MonitorGraph, NotFusable

    try:
        graph = MonitorGraph(bank.monitor)
    except NotFusable as exc:  # e.g. a detector's plugin that has no fused form here
        log.warning("torch backend: the monitor runs in numpy after the classifier, not in "
                    "the torch module: %s", exc)
        return TorchRuntime(module, device=settings.device)
    return TorchRuntime(FusedMonitoredClassifier(module, graph), device=settings.device,
                        graph="fused")


def bank_info(bank: Bank) -> dict[str, str]:
    m = bank.manifest
    return {"bank_id": m.bank_id, "vlm": str(m.vlm.get("id", "unknown")),
            "classifier_hash": m.classifier.hash, "schema_version": str(m.schema_version)}


def open_bank(path: Path, settings: Settings) -> tuple[Bank, Runtime]:
    """Load and validate a bank, start its runtime and check it end to end on a probe batch
    (blocking). Every failure is a :class:`BankError`."""
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
    return bank, runtime


def _smoke_test(bank: Bank, runtime: Runtime) -> None:
    """A probe batch end to end (runtime, then the core's ``score``): output shapes must
    match the manifest and every output and score must be finite; on the fused graph its
    scores must also agree with ``score`` (a ``monitor.onnx`` exported from other tensors
    is refused)."""
    from conceptguard.scoring import graph_disagreement, graph_tolerance, score, scores_from_graph

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
    for name in ("trust", "p_misclassification", "p_anomaly", "p_adversarial", "p_unfamiliar",
                 "contributions"):
        value = np.asarray(getattr(s, name), dtype=np.float64)
        if not np.isfinite(value).all():
            raise BankError(f"scoring the probe batch gives non-finite {name}")
    if out.monitor is not None:
        try:
            atol = graph_tolerance(bank.monitor, out.logits, out.features, out.concepts, s)
            problem = graph_disagreement(s, scores_from_graph(
                out.monitor, bank.monitor.threshold, bank.monitor.calibration), atol)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem and runtime.name.startswith("torch"):  # built from this bank's tensors
            raise BankError(f"the torch backend's monitor module disagrees with scoring on "
                            f"the probe batch: {problem}; serve this bank with "
                            f"CONCEPTGUARD_BACKEND=onnx and report it")
        if problem:
            raise BankError(f"the fused graph (monitor.onnx) disagrees with scoring on the "
                            f"probe batch: {problem}; re-export it with `conceptguard "
                            f"export-graph`")
