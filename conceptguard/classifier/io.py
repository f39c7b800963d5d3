"""Classifier spec, construction, and safetensors persistence with an integrity hash.

A saved classifier is one ``.safetensors`` file: the ``SplitClassifier`` state_dict plus
metadata ``{"spec": <ClassifierSpec JSON>, "hash": <sha256 of the tensors>}``. Loading never
unpickles anything; it rebuilds the architecture from the spec and verifies the hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conceptguard.atomic import atomic_path
from conceptguard.classifier.demo_resnet import small_resnet
from conceptguard.classifier.hashing import spec_from_metadata
from conceptguard.classifier.onnx_module import onnx_split_classifier
from conceptguard.classifier.spec import ONNX_ARCH, SMALL_RESNET, ClassifierSpec
from conceptguard.classifier.split import (
    SplitClassifier,
    split_by_layer,
    split_torchvision_resnet,
)

_RESNET_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                 "avgpool", "fc")


def build_classifier(spec: ClassifierSpec,
                     tensors: Mapping[str, torch.Tensor] | None = None) -> SplitClassifier:
    """A randomly initialised ``SplitClassifier`` with the spec's architecture. An imported
    ONNX classifier (``arch="onnx"``) is rebuilt from its graphs, which are among its file's
    ``tensors``."""
    if spec.arch == ONNX_ARCH:
        if tensors is None:
            raise ValueError("an imported ONNX classifier is rebuilt from its file's tensors "
                             "(use load_classifier)")
        return onnx_split_classifier(spec, tensors)
    return split_backbone(build_backbone(spec), spec)


def split_backbone(model: nn.Module, spec: ClassifierSpec) -> SplitClassifier:
    """``model`` (a backbone of ``spec``'s architecture) split at ``spec.head_layer``."""
    if spec.head_layer == "fc" and all(hasattr(model, name) for name in _RESNET_PARTS):
        return split_torchvision_resnet(model, spec.mean, spec.std, spec.input_shape)
    return split_by_layer(model, spec.head_layer, spec.mean, spec.std, spec.input_shape)


def build_backbone(spec: ClassifierSpec) -> nn.Module:
    """The unsplit network of ``spec``'s architecture, randomly initialised."""
    if spec.arch == SMALL_RESNET:
        widths = spec.widths if spec.widths is not None else (16, 32, 64, 128)
        return small_resnet(spec.num_classes, spec.in_channels, widths)
    known = torchvision.models.list_models(module=torchvision.models)
    if spec.arch not in known:
        raise ValueError(f"unknown arch {spec.arch!r}: use {SMALL_RESNET!r}, {ONNX_ARCH!r} (made "
                         "by import-classifier) or a torchvision classification model "
                         f"({', '.join(sorted(known)[:5])}, ...)")
    model = torchvision.models.get_model(spec.arch, weights=None, num_classes=spec.num_classes)
    if spec.in_channels != 3:
        _adapt_first_conv(model, spec.in_channels)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first ``Conv2d`` by one with ``in_channels`` inputs (same geometry)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, child_name = name.rpartition(".")
            replacement = nn.Conv2d(
                in_channels, module.out_channels, kernel_size=module.kernel_size,
                stride=module.stride, padding=module.padding, dilation=module.dilation,
                bias=module.bias is not None)
            setattr(model.get_submodule(parent_name), child_name, replacement)
            return
    raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to {in_channels} channels")


def classifier_hash(model: nn.Module) -> str:
    """sha256 hex over the sorted ``(name, dtype, shape, bytes)`` of ``model.state_dict()``."""
    return _tensors_hash(model.state_dict())


def _tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{len(data)}\0"
        digest.update(header.encode())
        digest.update(data)
    return digest.hexdigest()


def save_classifier(model: SplitClassifier, spec: ClassifierSpec, path: Path) -> str:
    """Atomically write ``model`` and ``spec`` to a safetensors file; return the hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    digest = _tensors_hash(tensors)
    metadata = {"spec": spec.model_dump_json(), "hash": digest}
    with atomic_path(path) as tmp:  # published 0o644, as every result file
        save_file(tensors, str(tmp), metadata=metadata)
    return digest


def verify_classifier_file(path: Path) -> tuple[ClassifierSpec, str, dict[str, torch.Tensor]]:
    """Read a file saved by :func:`save_classifier` and check its hash, without building
    the model: ``(spec, hash, tensors)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier file not found: {path}")
    spec, stored_hash = _read_metadata(path)
    try:
        tensors = load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path}: unreadable safetensors file ({err})") from err
    actual_hash = _tensors_hash(tensors)
    if actual_hash != stored_hash:
        raise ValueError(f"{path}: hash mismatch (stored {stored_hash[:12]}..., tensors hash to "
                         f"{actual_hash[:12]}...); the file was modified or is corrupt")
    return spec, actual_hash, tensors


def load_classifier(path: Path) -> tuple[SplitClassifier, ClassifierSpec, str]:
    """Load a classifier saved by :func:`save_classifier`, verifying its hash; eval mode."""
    path = Path(path)
    spec, actual_hash, tensors = verify_classifier_file(path)
    model = build_classifier(spec, tensors)
    _check_tensors(model, tensors, path)
    model.load_state_dict(tensors, strict=True)
    _check_normalisation(model, spec, path)
    return model.eval(), spec, actual_hash


def read_classifier_spec(path: Path) -> ClassifierSpec:
    """A classifier file's spec, from its metadata alone (no tensor is read)."""
    return _read_metadata(Path(path))[0]


def _read_metadata(path: Path) -> tuple[ClassifierSpec, str]:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    return spec_from_metadata(metadata, path)


def _check_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Clear errors for missing/unexpected keys and shape/dtype mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the spec's architecture; "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"{path}: shape/dtype mismatch for {name!r}: file has "
                             f"{tuple(got.shape)} {got.dtype}, spec's architecture needs "
                             f"{tuple(want.shape)} {want.dtype}")


def _check_normalisation(model: SplitClassifier, spec: ClassifierSpec, path: Path) -> None:
    """The stored mean/std buffers must agree with the spec's mean/std."""
    for name, values in (("mean", spec.mean), ("std", spec.std)):
        buffer = getattr(model, name).flatten().tolist()
        if not torch.allclose(torch.tensor(buffer), torch.tensor(values, dtype=torch.float32)):
            raise ValueError(f"{path}: spec {name} {values} disagrees with the stored "
                             f"{name} buffer {buffer}")
