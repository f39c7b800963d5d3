"""The classifier's head for the sidecar path (``/v1/monitor`` without logits): logits
from features. A linear head (the usual case) runs in numpy from the classifier file's
``head.weight`` / ``head.bias``, so the ONNX backend needs no torch for it; any other head
is the classifier's own torch module."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.runtime_state import Loaded


def onnx_head_weights(loaded: Loaded) -> tuple[np.ndarray, np.ndarray] | None:
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


def classifier_module(loaded: Loaded) -> Any:
    runtime: Any = loaded.runtime
    if runtime.name.startswith("torch") and runtime.device == "cpu":
        return runtime.serving.classifier  # the torch runtime's own classifier
    return _load_classifier(loaded.bank.classifier_path)


def _load_classifier(path: Path) -> Any:
    from conceptguard.classifier.io import load_classifier

    return load_classifier(path)[0].eval()
