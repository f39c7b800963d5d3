"""The classifier spec (architecture, not weights): pydantic only, no torch, so the serving
path can read and validate it without importing torch."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, model_validator

SMALL_RESNET = "small_resnet"
ONNX_ARCH = "onnx"  # imported from an ONNX file: the graphs travel in the classifier file


class ClassifierSpec(BaseModel):
    """Everything needed to rebuild a classifier's architecture (not its weights)."""

    model_config = ConfigDict(extra="forbid")

    arch: str  # "small_resnet", "onnx" or a torchvision classification model, e.g. "resnet18"
    num_classes: int
    in_channels: int
    input_size: int  # square inputs: H = W = input_size
    widths: list[int] | None = None  # small_resnet only
    head_layer: str = "fc"
    mean: list[float]
    std: list[float]
    classes: list[str]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.num_classes < 1 or self.in_channels < 1 or self.input_size < 1:
            raise ValueError("num_classes, in_channels and input_size must be positive")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean and std need {self.in_channels} entries (in_channels)")
        if min(self.std) <= 0:
            raise ValueError("std entries must be positive")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes={self.num_classes}")
        if self.widths is not None and self.arch != SMALL_RESNET:
            raise ValueError(f"widths only apply to {SMALL_RESNET!r}, not {self.arch!r}")
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)
