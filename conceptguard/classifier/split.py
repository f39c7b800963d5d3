"""A classifier with an explicit encoder/head split and built-in input normalisation.

``SplitClassifier`` takes float images in ``[0, 1]`` (NCHW), normalises them per channel with
buffers ``mean``/``std`` and returns logits = ``head(encoder(x))``. The features ``z`` are the
flattened encoder output (the penultimate layer).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

_RESNET_ENCODER_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                         "layer4", "avgpool")
_EQUIVALENCE_ATOL = 1e-5


class SplitClassifier(nn.Module):
    """``logits = head(encoder((x - mean) / std).flatten(1))`` for ``x`` in ``[0, 1]``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, encoder: nn.Module, head: nn.Module, mean: Sequence[float],
                 std: Sequence[float], input_shape: Sequence[int]) -> None:
        super().__init__()
        shape = _check_input_shape(input_shape)
        _check_normalisation(mean, std, shape[0])
        self.encoder = encoder
        self.head = head
        self.register_buffer("mean", _channel_buffer(mean))
        self.register_buffer("std", _channel_buffer(std))
        self.input_shape: tuple[int, int, int] = shape
        self._dims: tuple[int, int] | None = None

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[0, 1]`` pixels to the encoder's input scale."""
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``z`` of shape ``(N, d)``."""
        return self.encoder(self.normalise(x)).flatten(1)

    def head_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` from features ``z``."""
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, z)`` in one pass."""
        z = self.features(x)
        return self.head_logits(z), z

    @property
    def feature_dim(self) -> int:
        return self._infer_dims()[0]

    @property
    def num_classes(self) -> int:
        return self._infer_dims()[1]

    def _infer_dims(self) -> tuple[int, int]:
        if self._dims is None:
            if isinstance(self.head, nn.Linear):
                self._dims = (self.head.in_features, self.head.out_features)
            else:
                self._dims = self._probe_dims()
        return self._dims

    def _probe_dims(self) -> tuple[int, int]:
        device = self.mean.device
        with torch.no_grad(), _eval_mode(self):
            logits, z = self.forward_with_features(torch.rand(2, *self.input_shape, device=device))
        return int(z.shape[1]), int(logits.shape[1])


@contextmanager
def _eval_mode(*roots: nn.Module) -> Iterator[None]:
    """Put modules in eval mode; restore every submodule's training flag afterwards."""
    saved = [(module, module.training) for root in roots for module in root.modules()]
    for root in roots:
        root.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def _channel_buffer(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32).view(1, -1, 1, 1)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive entries, got {input_shape}")
    return shape  # type: ignore[return-value]


def _check_normalisation(mean: Sequence[float], std: Sequence[float], channels: int) -> None:
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} entries (one per channel), "
                         f"got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise ValueError(f"std entries must be positive, got {list(std)}")


def split_torchvision_resnet(model: nn.Module, mean: Sequence[float], std: Sequence[float],
                             input_shape: Sequence[int]) -> SplitClassifier:
    """Split a torchvision-style ResNet into encoder (stem..avgpool + flatten) and head (``fc``).

    The modules are shared with ``model`` (no copies); state_dict keys become
    ``encoder.<part>...`` and ``head...``.
    """
    missing = [name for name in (*_RESNET_ENCODER_PARTS, "fc") if not hasattr(model, name)]
    if missing:
        raise ValueError(f"model is not a torchvision-style ResNet: missing {missing}")
    parts: OrderedDict[str, nn.Module] = OrderedDict(
        (name, getattr(model, name)) for name in _RESNET_ENCODER_PARTS)
    parts["flatten"] = nn.Flatten(1)
    split = SplitClassifier(nn.Sequential(parts), model.fc, mean, std, input_shape)
    _check_equivalent(model, split, "fc")
    return split


def split_by_layer(model: nn.Module, head_layer: str, mean: Sequence[float],
                   std: Sequence[float], input_shape: Sequence[int]) -> SplitClassifier:
    """Split ``model`` at ``head_layer``, the dotted name of the last layer it applies.

    The encoder is a deep copy of ``model`` with that layer replaced by ``nn.Identity``; the
    head is the original layer. Raises ``ValueError`` when the layer does not exist or is not
    the final one (checked with a dummy forward pass).
    """
    head = _get_layer(model, head_layer)
    encoder = copy.deepcopy(model)
    parent_name, _, child_name = head_layer.rpartition(".")
    setattr(encoder.get_submodule(parent_name), child_name, nn.Identity())
    split = SplitClassifier(encoder, head, mean, std, input_shape)
    _check_equivalent(model, split, head_layer)
    return split


def _get_layer(model: nn.Module, name: str) -> nn.Module:
    if not name:
        raise ValueError("head_layer must name a submodule, got an empty string")
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"head_layer {name!r} does not exist in {type(model).__name__}") from err


def _check_equivalent(model: nn.Module, split: SplitClassifier, head_layer: str) -> None:
    """Raise ``ValueError`` unless ``head(encoder(x)) == model(x)`` on a random input."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.rand(2, *split.input_shape, device=device)
    not_final = (f"head_layer {head_layer!r} is not the final layer of "
                 f"{type(model).__name__}: head(encoder(x)) != model(x)")
    with torch.no_grad(), _eval_mode(model, split):
        try:
            expected = model(x)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{type(model).__name__} fails on a dummy input of shape "
                             f"{tuple(x.shape)}; check input_shape ({err})") from err
        try:
            actual = split.head(split.encoder(x).flatten(1))
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{not_final} ({err})") from err
    if expected.shape != actual.shape:
        raise ValueError(f"{not_final} (shapes {tuple(actual.shape)} vs {tuple(expected.shape)})")
    diff = (expected - actual).abs().max().item() if expected.numel() else 0.0
    if diff > _EQUIVALENCE_ATOL:
        raise ValueError(f"{not_final} (max abs difference {diff:.3g})")
