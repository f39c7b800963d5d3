"""Import a classifier trained elsewhere into the project's classifier file.

Two sources: a torchvision architecture with its weights (a ``.safetensors`` file, or a
state dict that ``torch.load(..., weights_only=True)`` reads), and an ONNX classifier (its
encoder converted to torch with onnx2torch, so attacks get gradients). Either way the
caller gives the class names, the input size and channels, and the normalisation the model
was trained with (per channel, for pixels in ``[0, 1]``).

The imported model must compute the source's logits: :func:`compare_logits` runs both on
the same seeded images and the caller refuses the import when the largest difference
exceeds :func:`logits_tolerance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from conceptguard.classifier import onnx_graph as og
from conceptguard.classifier.io import build_backbone, split_backbone
from conceptguard.classifier.onnx_module import OnnxHead, OnnxModule, as_linear
from conceptguard.classifier.spec import ONNX_ARCH, ClassifierSpec
from conceptguard.classifier.split import SplitClassifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
F32_EPS = float(np.finfo(np.float32).eps)
# Two float32 implementations of one network (torch vs. ONNX Runtime kernels, other
# summation orders) differ by rounding: each reordered sum of n terms by up to about
# n * eps relative to its terms' magnitude. 2**12 eps (4.9e-4) relative to the logits'
# magnitude covers sums of thousands of terms through tens of layers; a wrong weight, layer
# or normalisation changes logits by a sizeable fraction of that magnitude instead.
_HEADROOM = 2.0 ** 12
CHECK_IMAGES = 8

Source = Callable[[np.ndarray], np.ndarray]  # normalised float32 NCHW -> logits


@dataclass(frozen=True)
class Imported:
    """An imported classifier before it is saved, with the source model to compare to."""

    model: SplitClassifier
    spec: ClassifierSpec
    source: Source  # the original model on normalised inputs
    origin: str  # what was imported, for the summary


def normalisation(name: str | None, mean: Sequence[float] | None, std: Sequence[float] | None,
                  channels: int) -> tuple[list[float], list[float]]:
    """The per-channel mean and std: explicit values, or a preset (``imagenet``: the
    torchvision ImageNet statistics; ``none``: mean 0, std 1, for models that take pixels
    in [0, 1]). ``ValueError`` when missing or of the wrong length."""
    if name is not None and (mean is not None or std is not None):
        raise ValueError("give either --normalisation or --mean and --std, not both")
    if name == "imagenet":
        if channels != 3:
            raise ValueError(f"the imagenet normalisation has 3 channels, not {channels}")
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if name == "none":
        return [0.0] * channels, [1.0] * channels
    if name is not None:
        raise ValueError(f"unknown normalisation {name!r}; use imagenet or none, or give "
                         "--mean and --std")
    if mean is None or std is None:
        raise ValueError("normalisation missing: give --mean and --std (one value per "
                         "channel, for pixels in [0, 1], as the model was trained), or "
                         "--normalisation imagenet|none")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"--mean and --std need {channels} values (one per channel), got "
                         f"{len(mean)} and {len(std)}")
    if not all(math.isfinite(v) for v in (*mean, *std)):
        raise ValueError(f"--mean and --std values must be finite numbers, got "
                         f"{list(mean)} and {list(std)}")
    if min(std) <= 0:
        raise ValueError(f"--std values must be positive, got {list(std)}")
    return [float(v) for v in mean], [float(v) for v in std]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from ``.safetensors`` or from a file ``torch.load(weights_only=True)`` reads
    (a state dict, or a checkpoint dict holding one under ``state_dict``/``model``); a
    ``module.`` prefix (DataParallel) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return dict(load_file(path))
        except SafetensorError as err:
            raise ValueError(f"{path}: unreadable safetensors file ({err})") from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a state dict that torch.load(weights_only=True) can "
                         f"read ({first}); save model.state_dict() instead") from err
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not loaded or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def head_layer_of(model: nn.Module) -> str:
    """The name of the last ``nn.Linear`` of ``model`` (``fc`` for ResNets)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layer to split off as its head")
    return names[-1]


def import_torchvision(arch: str, weights: Mapping[str, torch.Tensor], classes: list[str],
                       input_size: int, channels: int, mean: list[float], std: list[float]
                       ) -> Imported:
    """A torchvision classification model with ``weights``, split at its last linear layer."""
    probe = ClassifierSpec(arch=arch, num_classes=len(classes), in_channels=channels,
                           input_size=input_size, mean=mean, std=std, classes=classes)
    backbone = build_backbone(probe)
    head = head_layer_of(backbone)
    _check_class_count(weights, head, len(classes))
    try:
        result = backbone.load_state_dict(dict(weights), strict=False)
    except RuntimeError as err:  # shape mismatches, e.g. another channel count
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise ValueError(f"the weights do not fit torchvision {arch!r} with {channels} "
                         f"channels and {len(classes)} classes: "
                         f"{lines[0] if lines else str(err).splitlines()[0]}") from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"the weights do not fit torchvision {arch!r}: missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    backbone.eval()
    _check_runs(lambda x: backbone(torch.as_tensor(x)), channels, input_size)
    spec = probe.model_copy(update={"head_layer": head})
    model = split_backbone(backbone, spec).eval()

    def source(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return backbone(torch.as_tensor(x)).numpy()

    return Imported(model, spec, source, f"torchvision {arch}")


def _check_class_count(weights: Mapping[str, torch.Tensor], head: str, n: int) -> None:
    weight = weights.get(f"{head}.weight")
    if weight is not None and weight.ndim == 2 and weight.shape[0] != n:
        raise ValueError(f"{n} class names, but the head ({head}.weight) has "
                         f"{weight.shape[0]} outputs")


def _check_runs(run: Callable[[np.ndarray], object], channels: int, size: int) -> None:
    x = np.zeros((2, channels, size, size), np.float32)
    try:
        with torch.no_grad():
            run(x)
    except Exception as err:  # torch and ONNX Runtime raise many types
        raise ValueError(f"the model rejects inputs of {channels} x {size} x {size} "
                         f"(--channels, --input-size): {_first_line(err)}") from err


def import_onnx(path: Path, classes: list[str], input_size: int, channels: int,
                mean: list[float], std: list[float], features: str | None = None) -> Imported:
    """An ONNX classifier: the encoder converted to torch (onnx2torch), the head the final
    Gemm/MatMul (+ Add) as a linear layer, or, with ``features`` named, the graph from that
    tensor to the output."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        original = onnx.load(str(path))
    except Exception as err:
        raise ValueError(f"{path}: not a readable ONNX model ({err})") from err
    try:
        model = og.normalised(original)
        session = ort.InferenceSession(original.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
    except Exception as err:  # onnx and ONNX Runtime raise their own types
        raise ValueError(f"{path}: ONNX Runtime cannot load the model "
                         f"({_first_line(err)})") from err
    inp = og.image_input(model)
    _check_static_dims(inp, channels, input_size)

    def source(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {inp.name: x.astype(np.float32)})[0])

    _check_runs(source, channels, input_size)
    n_out = source(np.zeros((2, channels, input_size, input_size), np.float32)).shape
    if len(n_out) != 2 or n_out[1] != len(classes):
        raise ValueError(f"{len(classes)} class names, but the model's output has shape "
                         f"{tuple(n_out)} (classes on axis 1)")
    feat, linear = _split_point(model, features)
    encoder = OnnxModule(og.subgraph(model, [inp.name], [feat]))
    head: nn.Module
    if linear is not None:
        head = as_linear(linear.weight, linear.bias)
    else:
        shape = og.feature_shape(model, feat)[1:]
        if not shape or any(d is None for d in shape):
            with torch.no_grad():
                shape = tuple(encoder(torch.zeros(1, channels, input_size, input_size)).shape[1:])
        head = OnnxHead(og.subgraph(model, [feat], [og.output_name(model)]),
                        [int(d) for d in shape])  # type: ignore[arg-type]
    spec = ClassifierSpec(arch=ONNX_ARCH, num_classes=len(classes), in_channels=channels,
                          input_size=input_size, head_layer="head", mean=mean, std=std,
                          classes=classes)
    split = SplitClassifier(encoder, head, mean, std, spec.input_shape).eval()
    origin = f"ONNX {path.name} (features: {feat!r})"
    return Imported(split, spec, source, origin)


def _split_point(model: Any, features: str | None) -> tuple[str, og.LinearHead | None]:
    """The penultimate features tensor and, when the head after it is one linear layer
    (the final Gemm/MatMul + Add), that layer."""
    if features is None:
        linear = og.find_linear_head(model)  # "no detectable head" when there is none
        return linear.features, linear
    try:
        linear = og.find_linear_head(model)
    except ValueError:
        return features, None
    return features, linear if linear.features == features else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _check_static_dims(inp: og.OnnxInput, channels: int, size: int) -> None:
    n, c, h, w = inp.dims
    if n is not None:
        raise ValueError(f"the ONNX model's batch axis is fixed at {n}; export it with a "
                         "dynamic batch axis (torch.onnx.export's dynamic_axes)")
    if c is not None and c != channels:
        raise ValueError(f"the ONNX model takes {c} channels on axis 1 (NCHW), --channels "
                         f"says {channels}")
    if (h is not None and h != size) or (w is not None and w != size):
        raise ValueError(f"the ONNX model takes {h} x {w} inputs, --input-size says {size}")


def check_images(channels: int, size: int, n: int = CHECK_IMAGES, seed: int = 0
                 ) -> np.ndarray:
    """Seeded uniform images in ``[0, 1]``, float32 NCHW: the logits check's inputs."""
    rng = np.random.default_rng(seed)
    return rng.random((n, channels, size, size), dtype=np.float32)


def logits_tolerance(reference: np.ndarray) -> float:
    """The largest difference accepted between the source's and the import's logits."""
    return F32_EPS * _HEADROOM * max(1.0, float(np.abs(reference).max()))


def compare_logits(imported: SplitClassifier, source: Source, spec: ClassifierSpec
                   ) -> tuple[float, float]:
    """``(largest |difference|, tolerance)`` of the logits of ``imported`` (pixels in
    [0, 1]) and ``source`` (the same pixels normalised) on seeded images."""
    x = check_images(spec.in_channels, spec.input_size)
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    want = source((x - mean) / std)
    with torch.no_grad():
        got = imported.eval()(torch.from_numpy(x)).numpy()
    if got.shape != want.shape:
        raise ValueError(f"imported logits have shape {got.shape}, the source's {want.shape}")
    return float(np.abs(got - want).max()), logits_tolerance(want)

