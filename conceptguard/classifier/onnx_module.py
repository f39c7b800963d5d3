"""Torch modules rebuilt from ONNX graphs, for classifiers imported from an ONNX file.

An imported ONNX classifier's file holds its graphs as ``uint8`` tensors: the encoder's
(``encoder.graph``: image -> penultimate features) and, when the head is not one linear
layer, the head's (``head.net.graph``, with ``head.feature_shape``). :class:`OnnxModule`
converts a graph to torch with onnx2torch (so attacks get gradients) and keeps only the
graph bytes in its ``state_dict``: the converted weights are derived from them, so the file
and its hash hold each weight once.

A graph onnx2torch cannot convert runs in ONNX Runtime instead (forward only:
:attr:`OnnxModule.has_gradients` is False, and build-bank then skips the attacks and says
so). Exported to ONNX, such a module is one placeholder node (:data:`PLACEHOLDER_OP`) that
:func:`inline_graphs` replaces by the graph's own nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Self

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


PLACEHOLDER_DOMAIN = "conceptguard.inline"
PLACEHOLDER_OP = "OnnxGraph"
_INLINE: dict[str, bytes] = {}  # placeholder key -> graph bytes (this process's modules)


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
    """``forward`` = the converted graph (ONNX Runtime when onnx2torch cannot convert it);
    ``state_dict`` = the graph's bytes only."""

    graph: torch.Tensor

    def __init__(self, graph: torch.Tensor | bytes) -> None:
        super().__init__()
        tensor = graph_tensor(graph) if isinstance(graph, bytes) else graph
        self.register_buffer("graph", tensor.detach().to(torch.uint8).contiguous())
        raw = tensor.cpu().numpy().tobytes()
        net: nn.Module
        try:
            net = convert_graph(raw)
            self.conversion_error: str | None = None
        except ValueError as err:
            net = OrtGraph(raw)
            self.conversion_error = str(err)
        for p in net.parameters():
            p.requires_grad_(False)  # frozen: gradients flow to the input only
        object.__setattr__(self, "_net", net)  # not a child: its weights are not state

    @property
    def has_gradients(self) -> bool:
        """False when the graph runs in ONNX Runtime (onnx2torch could not convert it)."""
        return self.conversion_error is None

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


class OrtGraph(nn.Module):
    """A one-input, one-output ONNX graph run by ONNX Runtime on the CPU (no gradients);
    traced for export as a placeholder node that :func:`inline_graphs` fills in."""

    def __init__(self, graph: bytes) -> None:
        super().__init__()
        import hashlib

        import onnxruntime as ort

        self.key = hashlib.sha256(graph).hexdigest()[:16]
        _INLINE[self.key] = graph
        self.session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _OrtCall.apply(x, self)


class _OrtCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: OrtGraph) -> torch.Tensor:
        feed = {module.input_name: x.detach().cpu().float().numpy()}
        return torch.from_numpy(np.asarray(module.session.run(None, feed)[0])).to(x.device)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        raise RuntimeError("this ONNX graph runs in ONNX Runtime and has no gradients")

    @staticmethod
    def symbolic(g: Any, x: Any, module: OrtGraph) -> Any:
        return g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", x, key_s=module.key)


def has_gradients(model: nn.Module) -> bool:
    """False when some ONNX graph of ``model`` runs in ONNX Runtime (no attacks possible)."""
    return all(m.has_gradients for m in model.modules() if isinstance(m, OnnxModule))


def conversion_errors(model: nn.Module) -> list[str]:
    return [m.conversion_error for m in model.modules()
            if isinstance(m, OnnxModule) and m.conversion_error]


def inline_graphs(model: Any) -> Any:
    """An exported ``onnx.ModelProto`` with every placeholder node replaced by the nodes
    and initializers of its graph (names prefixed, so they stay unique); unchanged when it
    has none."""
    import onnx
    from onnx import version_converter

    nodes = list(model.graph.node)
    if not any(n.domain == PLACEHOLDER_DOMAIN for n in nodes):
        return model
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    out: list[Any] = []
    for i, node in enumerate(nodes):
        if node.domain != PLACEHOLDER_DOMAIN:
            out.append(node)
            continue
        key = next(a.s.decode() for a in node.attribute if a.name == "key")
        sub = onnx.load_from_string(_INLINE[key])
        if next(o.version for o in sub.opset_import if o.domain in ("", "ai.onnx")) != opset:
            sub = version_converter.convert_version(sub, opset)
        sub = onnx.compose.add_prefix(sub, f"inline{i}_")
        rename = {sub.graph.input[0].name: node.input[0], sub.graph.output[0].name: node.output[0]}
        for sn in sub.graph.node:
            for j, name in enumerate(sn.input):
                sn.input[j] = rename.get(name, name)
            for j, name in enumerate(sn.output):
                sn.output[j] = rename.get(name, name)
            out.append(sn)
        model.graph.initializer.extend(sub.graph.initializer)
    del model.graph.node[:]
    model.graph.node.extend(out)
    keep = [o for o in model.opset_import if o.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


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


def as_linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    """``nn.Linear`` holding ``weight`` (C, d) and ``bias`` (C,)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(np.array(weight, np.float32)))
        layer.bias.copy_(torch.as_tensor(np.array(bias, np.float32)))
    return layer

