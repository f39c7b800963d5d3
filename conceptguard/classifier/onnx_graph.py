"""Reading an ONNX classifier: its image input, its head and its encoder/head split.

The penultimate features are the input of the final linear layer: a ``Gemm`` (weight and
bias initializers), or a ``MatMul`` with a weight initializer, optionally followed by an
``Add`` of a bias initializer, that produces the graph's (first) output. A graph whose
output comes from anything else has no detectable head: name the features tensor instead,
and the graph from it to the output becomes the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.utils import Extractor


@dataclass(frozen=True)
class OnnxInput:
    name: str
    dims: tuple[int | None, ...]  # None: a symbolic (dynamic) axis


@dataclass(frozen=True)
class LinearHead:
    """``logits = features @ weight.T + bias``."""

    features: str
    weight: np.ndarray  # (C, d)
    bias: np.ndarray  # (C,)


def normalised(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every weight is an initializer: ``Constant`` nodes and ``Identity``
    nodes of initializers (torch's exporter writes both) become initializers, as onnx2torch
    expects."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        tensor = None
        if node.op_type == "Constant" and len(node.output) == 1:
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(value.t)
        elif node.op_type == "Identity" and node.input[0] in inits:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[node.input[0]])
        if tensor is None:
            kept.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        inits[tensor.name] = tensor
    del graph.node[:]
    graph.node.extend(kept)
    return onnx.shape_inference.infer_shapes(out)


def image_input(model: onnx.ModelProto) -> OnnxInput:
    """The graph's one non-initializer input, which must be 4-D (N, C, H, W)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"the ONNX graph has {len(inputs)} inputs "
                         f"({[i.name for i in inputs]}); an image classifier takes one")
    dims = _dims(inputs[0].type)
    if len(dims) != 4:
        raise ValueError(f"the ONNX input {inputs[0].name!r} has {len(dims)} axes; "
                         "an image classifier takes (N, C, H, W)")
    return OnnxInput(inputs[0].name, dims)


def output_name(model: onnx.ModelProto) -> str:
    """The logits: the graph's first output."""
    if not model.graph.output:
        raise ValueError("the ONNX graph has no output")
    return model.graph.output[0].name


def find_linear_head(model: onnx.ModelProto) -> LinearHead:
    """The final linear layer that produces the logits; ``ValueError`` when there is none."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    logits = output_name(model)
    node = producers.get(logits)
    what = node.op_type if node is not None else "no node"
    no_head = (f"no detectable head in the ONNX graph: its output {logits!r} comes from "
               f"{what}, not from a final Gemm or MatMul (+ Add) with weight initializers; "
               "name the penultimate features with --features (the head after them must "
               "be affine: a model that ends in a softmax is exported without it)")
    if node is None:
        raise ValueError(no_head)
    if node.op_type == "Gemm":
        return _gemm_head(node, inits, no_head)
    bias: np.ndarray | None = None
    if node.op_type == "Add":
        a, b = node.input
        bias_name, other = (b, a) if b in inits else (a, b)
        if bias_name not in inits or other not in producers:
            raise ValueError(no_head)
        bias, node = inits[bias_name], producers[other]
    if node.op_type != "MatMul" or node.input[1] not in inits:
        raise ValueError(no_head)
    weight = inits[node.input[1]].astype(np.float32).T  # MatMul: x (N, d) @ B (d, C)
    if weight.ndim != 2:
        raise ValueError(no_head)
    bias = np.zeros(weight.shape[0], np.float32) if bias is None else bias
    return LinearHead(node.input[0], weight, _as_bias(bias, weight.shape[0], no_head))


def _gemm_head(node: onnx.NodeProto, inits: dict[str, np.ndarray], no_head: str
               ) -> LinearHead:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or node.input[1] not in inits:
        raise ValueError(no_head)
    b = inits[node.input[1]].astype(np.float32)
    weight = (b if attrs.get("transB", 0) else b.T) * np.float32(attrs.get("alpha", 1.0))
    c = (inits[node.input[2]] if len(node.input) > 2 and node.input[2] else
         np.zeros(weight.shape[0], np.float32))
    if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        raise ValueError(no_head)
    bias = np.asarray(c, np.float32) * np.float32(attrs.get("beta", 1.0))
    return LinearHead(node.input[0], weight, _as_bias(bias, weight.shape[0], no_head))


def _as_bias(bias: np.ndarray, classes: int, no_head: str) -> np.ndarray:
    bias = np.asarray(bias, np.float32)
    if bias.size == 1:
        return np.full(classes, float(bias.reshape(-1)[0]), np.float32)
    if bias.size != classes:
        raise ValueError(no_head)
    return bias.reshape(classes)


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every value name in the graph (node outputs and inputs)."""
    names = {i.name for i in model.graph.input}
    return names | {out for node in model.graph.node for out in node.output}


def subgraph(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> bytes:
    """The serialised part of ``model`` from ``inputs`` to ``outputs``."""
    known = tensor_names(model)
    missing = [n for n in (*inputs, *outputs) if n not in known]
    if missing:
        raise ValueError(f"no tensor named {missing[0]!r} in the ONNX graph")
    return Extractor(model).extract_model(inputs, outputs).SerializeToString()


def feature_shape(model: onnx.ModelProto, name: str) -> tuple[int | None, ...]:
    """The inferred shape of value ``name`` (``None`` for unknown axes; () if unknown)."""
    for info in (*model.graph.value_info, *model.graph.output, *model.graph.input):
        if info.name == name:
            return _dims(info.type)
    return ()


def _dims(tensor_type: onnx.TypeProto) -> tuple[int | None, ...]:
    shape = tensor_type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in shape.dim)
