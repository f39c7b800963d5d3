"""Inference runtimes for the serving graph: ONNX Runtime (default) or torch.

Both take float32 ``(N, C, H, W)`` images in [0, 1] and return logits, features and
standardised concept scores; on the fused graph (``monitor.onnx``, or the torch runtime's
fused module) they also return every monitor output of the same call
(:attr:`RuntimeOutputs.monitor`). CUDA is
used when present, the CPU otherwise. ``device`` and ``provider`` say what a runtime really
runs on: for ONNX Runtime they are read from the session's providers (not from the list of
providers installed), and ``device="cuda"`` fails clearly when the session fell back to the
CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from conceptguard.graph import FUSED_OUTPUTS, INPUT_NAME, MONITOR_OUTPUTS, OUTPUT_NAMES

Backend = Literal["onnx", "torch"]
log = logging.getLogger("conceptguard.runtime")


@dataclass(frozen=True)
class RuntimeOutputs:
    logits: np.ndarray
    features: np.ndarray
    concepts: np.ndarray
    # the fused graph's MONITOR_OUTPUTS by name (see conceptguard.scoring.scores_from_graph);
    # None when the runtime runs the classifier graph alone
    monitor: dict[str, np.ndarray] | None = None


class Runtime(Protocol):
    name: str
    graph: str  # "fused" (monitor.onnx or the fused torch module: scores come out of the
    # runtime call) or "classifier" (numpy score() after it)
    device: str  # "cuda" or "cpu": where the graph actually runs
    provider: str  # e.g. "CUDAExecutionProvider", "CPUExecutionProvider", "torch-cuda"

    def run(self, images: np.ndarray) -> RuntimeOutputs: ...

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Logits only (the classifier alone, for overhead comparisons)."""
        ...


class OnnxRuntime:
    """An ONNX Runtime session on the bank's ``classifier.onnx``, or on its fused graph
    ``monitor.onnx`` (recognised by its outputs: :data:`FUSED_OUTPUTS`)."""

    name = "onnx"

    def __init__(self, onnx_path: Path, device: str = "auto", threads: int = 0):
        import onnxruntime as ort

        available = ort.get_available_providers()
        use_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        if device == "cuda" and not use_cuda:
            raise RuntimeError("device=cuda asked for, but onnxruntime has no CUDA provider "
                               "(install the 'gpu' extra: onnxruntime-gpu)")
        if use_cuda and hasattr(ort, "preload_dlls"):
            # CUDA and cuDNN from the nvidia-* wheels of the gpu extra: without torch in the
            # process nothing else loads them, and the CUDA provider would fall back
            try:
                ort.preload_dlls()
            except Exception as exc:  # a missing library shows up as the fallback below
                log.warning("onnxruntime.preload_dlls() failed: %s", exc)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda \
            else ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        # what the session really uses: ONNX Runtime falls back to the CPU with only a
        # warning when the CUDA provider cannot load (missing or mismatched CUDA libraries)
        session_providers = self.session.get_providers()
        self.provider = session_providers[0] if session_providers else "CPUExecutionProvider"
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        if use_cuda and self.device != "cuda":
            log.warning("onnxruntime: the CUDA provider did not load; running on %s",
                        session_providers)
        outputs = tuple(o.name for o in self.session.get_outputs())
        self.graph = "fused" if set(FUSED_OUTPUTS) <= set(outputs) else "classifier"
        self._outputs = list(FUSED_OUTPUTS if self.graph == "fused" else OUTPUT_NAMES)
        if device == "cuda" and self.device != "cuda":
            raise RuntimeError(
                f"device=cuda asked for, but the ONNX Runtime session runs on "
                f"{session_providers} (the CUDA provider did not load: check that the "
                f"onnxruntime-gpu build and the CUDA/cuDNN libraries share one CUDA major, "
                f"and the ONNX Runtime log above)")

    def run(self, images: np.ndarray) -> RuntimeOutputs:
        x = np.ascontiguousarray(images, dtype=np.float32)
        out = self.session.run(self._outputs, {INPUT_NAME: x})
        monitor = dict(zip(MONITOR_OUTPUTS, out[3:], strict=True)) if out[3:] else None
        return RuntimeOutputs(out[0], out[1], out[2], monitor)

    def classify(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run(["logits"], {INPUT_NAME: x})[0]


class TorchRuntime:
    """The same graph in torch eager (optionally ``torch.compile``). ``module`` is the
    serving graph (:class:`~conceptguard.export.MonitoredClassifier`: logits, features,
    concepts; scores then come from numpy ``score()``) or, with ``graph="fused"``, the
    classifier and the monitor as one module (:class:`~conceptguard.monitor_graph.
    FusedMonitoredClassifier`: the same outputs as ``monitor.onnx``, :data:`FUSED_OUTPUTS`),
    so that on CUDA the monitor runs beside the classifier and one copy per output comes
    back. ``compile``: ``torch.compile`` with ``compile_mode`` (``"reduce-overhead"`` adds
    CUDA graphs on CUDA)."""

    name = "torch"

    def __init__(self, module, device: str = "auto", compile: bool = False,
                 graph: Literal["classifier", "fused"] = "classifier",
                 compile_mode: str | None = None):
        import torch

        use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if device == "cuda" and not use_cuda:
            raise RuntimeError("device=cuda asked for, but torch sees no CUDA device")
        self._torch = torch
        self.device = "cuda" if use_cuda else "cpu"
        self.provider = f"torch-{self.device}"
        self.graph = graph
        self.module = module.eval().to(self.device)
        # the serving graph (logits, features, concepts), inside the fused module or itself
        self.serving = module.classifier if graph == "fused" else module
        self._forward = (torch.compile(self.module, mode=compile_mode) if compile
                         else self.module)
        if compile:
            self.name = "torch-compile"

    def run(self, images: np.ndarray) -> RuntimeOutputs:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
            outs = self._forward(x)
            if self.device == "cuda":  # every copy queued, one wait (not one per output)
                outs = [t.to("cpu", non_blocking=True) for t in outs]
                torch.cuda.current_stream().synchronize()
            out = [t.numpy() for t in outs]
        monitor = dict(zip(MONITOR_OUTPUTS, out[3:], strict=True)) if out[3:] else None
        return RuntimeOutputs(out[0], out[1], out[2], monitor)

    def classify(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
            return self.serving.classifier(x).cpu().numpy()
