"""The serving graph: classifier + concept projection in one module, exported to ONNX.

Outputs ``logits``, ``features`` and ``concepts`` (standardised concept scores), computed
by :func:`conceptguard.projection.concept_scores`, the same function the offline job uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from conceptguard.atomic import atomic_path
from conceptguard.classifier.split import SplitClassifier
from conceptguard.graph import INPUT_NAME, OUTPUT_NAMES
from conceptguard.projection import PROJECTION_KEYS, concept_scores


class MonitoredClassifier(nn.Module):
    """``images [0,1] NCHW -> (logits, features, concepts)``."""

    def __init__(self, classifier: SplitClassifier, projection: dict[str, np.ndarray]):
        super().__init__()
        self.classifier = classifier
        for name in PROJECTION_KEYS:
            self.register_buffer(name.replace(".", "_"),
                                 torch.as_tensor(np.asarray(projection[name], np.float32)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, z = self.classifier.forward_with_features(images)
        s = concept_scores(z, self.aligner_W, self.aligner_b, self.concepts_T,
                           self.projection_mu, self.projection_sigma)
        return logits, z, s


def export_onnx(module: MonitoredClassifier, input_shape: tuple[int, int, int], path: Path,
                opset: int = 17) -> None:
    """Export with a dynamic batch axis; written atomically."""
    dummy = torch.zeros((2, *input_shape), dtype=torch.float32)
    onnx_export(module, (dummy,), (INPUT_NAME,), OUTPUT_NAMES, path, opset)


def onnx_export(module: nn.Module, dummies: tuple[torch.Tensor, ...],
                input_names: Sequence[str], output_names: Sequence[str], path: Path,
                opset: int = 17) -> None:
    """``torch.onnx.export`` (TorchScript exporter) with axis 0 of every input and output
    dynamic (``batch``); written atomically."""
    module = module.eval()
    with atomic_path(path, suffix=".onnx.tmp") as tmp:
        torch.onnx.export(
            module, dummies, str(tmp), input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={n: {0: "batch"} for n in (*input_names, *output_names)},
            opset_version=opset, dynamo=False,
        )
        _inline_placeholders(str(tmp))


def _inline_placeholders(path: str) -> None:
    """Fill in the graphs of imported ONNX encoders that run in ONNX Runtime (exported as
    placeholder nodes; see ``conceptguard.classifier.onnx_module``)."""
    from conceptguard.classifier.onnx_module import PLACEHOLDER_DOMAIN, inline_graphs

    with open(path, "rb") as fh:
        if PLACEHOLDER_DOMAIN.encode() not in fh.read():
            return
    import onnx

    model = inline_graphs(onnx.load(path))
    onnx.checker.check_model(model)
    onnx.save(model, path)
