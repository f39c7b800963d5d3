"""Torch modules rebuilt from ONNX graphs, for classifiers imported from an ONNX file.

An imported ONNX classifier's file holds its graphs as ``uint8`` tensors: the encoder's
(``encoder.graph``: image -> penultimate features) and, when the head is not one linear
layer, the head's (``head.net.graph``, with ``head.feature_shape``). :class:`OnnxModule`
converts a graph to torch with onnx2torch (so attacks get gradients) and keeps only the
graph bytes in its ``state_dict``: the converted weights are derived from them, so the file
and its hash hold each weight once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Self

import numpy as np
import torch
from torch import nn

from conceptguard.classifier.spec import ClassifierSpec
from conceptguard.classifier.split import SplitClassifier

ENCODER_GRAPH = "encoder.graph"
HEAD_GRAPH = "head.net.graph"
HEAD_FEATURE_SHAPE = "head.feature_shape"


def graph_tensor(graph: bytes) -> torch.Tensor:
    """ONNX model bytes as a ``uint8`` tensor (how the classifier file stores them)."""
    return torch.from_numpy(np.frombuffer(graph, dtype=np.uint8).copy())


def convert_graph(graph: bytes) -> nn.Module:
    """onnx2torch's module of a serialised ONNX model; ``ValueError`` when it cannot."""
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as err:
        raise ValueError("converting ONNX to torch needs onnx and onnx2torch "
                         "(pip install 'conceptguard[offline]')") from err
    try:
        return convert(onnx.load_from_string(graph))
    except Exception as err:  # onnx2torch raises bare NotImplementedError/KeyError/...
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"onnx2torch cannot convert the graph: {detail}") from err


class OnnxModule(nn.Module):
    """``forward`` = the converted graph; ``state_dict`` = the graph's bytes only."""

    graph: torch.Tensor

    def __init__(self, graph: torch.Tensor | bytes) -> None:
        super().__init__()
        tensor = graph_tensor(graph) if isinstance(graph, bytes) else graph
        self.register_buffer("graph", tensor.detach().to(torch.uint8).contiguous())
        net = convert_graph(tensor.cpu().numpy().tobytes())
        for p in net.parameters():
            p.requires_grad_(False)  # frozen: gradients flow to the input only
        object.__setattr__(self, "_net", net)  # not a child: its weights are not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net(x)

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        self._net.train(mode)
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> Self:  # .to(device) and friends reach the converted weights too
        self._net._apply(fn)
        return super()._apply(fn, recurse)


class OnnxHead(nn.Module):
    """A head subgraph that takes features of ``feature_shape`` (per input): the flattened
    features ``z`` are reshaped back before the graph runs."""

    feature_shape: torch.Tensor

    def __init__(self, graph: torch.Tensor | bytes, feature_shape: torch.Tensor | list[int]
                 ) -> None:
        super().__init__()
        self.net = OnnxModule(graph)
        self.register_buffer("feature_shape",
                             torch.as_tensor(feature_shape, dtype=torch.int64).reshape(-1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shape = [int(v) for v in self.feature_shape.tolist()]
        return self.net(z.reshape(z.shape[0], *shape))


def onnx_split_classifier(spec: ClassifierSpec, tensors: Mapping[str, torch.Tensor]
                          ) -> SplitClassifier:
    """The ``SplitClassifier`` of an imported ONNX classifier, from its file's tensors."""
    if ENCODER_GRAPH not in tensors:
        raise ValueError(f"an ONNX classifier file needs the tensor {ENCODER_GRAPH!r}")
    encoder = OnnxModule(tensors[ENCODER_GRAPH])
    head: nn.Module
    if HEAD_GRAPH in tensors:
        head = OnnxHead(tensors[HEAD_GRAPH], tensors[HEAD_FEATURE_SHAPE])
    elif "head.weight" in tensors:
        weight = tensors["head.weight"]
        head = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias="head.bias" in tensors)
    else:
        raise ValueError(f"an ONNX classifier file needs head.weight or {HEAD_GRAPH}")
    return SplitClassifier(encoder, head, spec.mean, spec.std, spec.input_shape)


def linear_head(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    """``nn.Linear`` holding ``weight`` (C, d) and ``bias`` (C,)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(np.array(weight, np.float32)))
        layer.bias.copy_(torch.as_tensor(np.array(bias, np.float32)))
    return layer

