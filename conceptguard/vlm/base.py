"""The interface every VLM backend implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


class VLMSpec(BaseModel):
    """Which VLM to build. ``conse`` needs no download; ``open_clip`` takes a hub tag
    (``model``/``pretrained``) or a local checkpoint path in ``pretrained``."""

    model_config = ConfigDict(extra="forbid")

    backend: str = "conse"  # registered: vlm.registry.register_vlm, or an entry point
    model: str = "efficientnet-lite0+all-MiniLM-L6-v2"  # open_clip: architecture name
    pretrained: str | None = None  # open_clip: tag or path to a local checkpoint
    # input resolution of the image encoder; open_clip uses the model's native size unless
    # this field is set explicitly
    image_size: int = Field(112, ge=8)
    top_k: int = Field(10, ge=1)  # conse: number of ImageNet classes mixed per image
    batch_size: int = Field(64, ge=1)
    device: str = "cpu"
    invert: bool = False  # feed 255 - x: light-on-dark images (Fashion-MNIST) become dark-on-light

    @field_validator("backend")
    @classmethod
    def _registered(cls, name: str) -> str:
        from conceptguard.vlm.registry import available_vlms  # the registry imports this module

        if name not in available_vlms():
            raise ValueError(f"unknown VLM backend {name!r}; available: "
                             f"{', '.join(available_vlms()) or 'none'}")
        return name


@runtime_checkable
class VLMBackend(Protocol):
    """Image and text encoders into one L2-normalised space of dimension ``dim``."""

    id: str  # stable identifier written into the bank manifest
    dim: int

    def encode_images(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        """uint8 ``(N,H,W,C)`` (C = 1 or 3) -> float32 ``(N, dim)``, rows of unit norm."""
        ...

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """list of N strings -> float32 ``(N, dim)``, rows of unit norm."""
        ...
