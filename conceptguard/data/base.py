"""The in-memory dataset every source produces, and the typed spec that selects a source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


def check_labels(name: str, labels: np.ndarray, n_images: int, n_classes: int) -> None:
    """One label per image, each a class index."""
    if labels.shape != (n_images,):
        raise ValueError(f"{name}: {len(labels)} labels for {n_images} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{name}: labels outside 0..{n_classes - 1}")

@dataclass(frozen=True)
class ArrayDataset:
    """Images as uint8 ``(N, H, W, C)`` (C = 1 or 3), integer labels, class names.

    ``attributes`` is an optional ``(N, A)`` 0/1 matrix (RIVAL10) named by ``attribute_names``.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    attributes: np.ndarray | None = None
    attribute_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 (N,H,W,C), got "
                             f"{self.images.dtype} {self.images.shape}")
        if self.images.shape[-1] not in (1, 3):
            raise ValueError(f"{self.name}: images must have 1 or 3 channels")
        check_labels(self.name, self.labels, len(self.images), len(self.classes))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        attrs = None if self.attributes is None else self.attributes[indices]
        return ArrayDataset(self.name, self.images[indices], self.labels[indices],
                            self.classes, attrs, self.attribute_names)

    def load(self) -> ArrayDataset:
        """Already in memory (the interface of :class:`conceptguard.data.lazy.LazyDataset`)."""
        return self


class DataSpec(BaseModel):
    """Which dataset to load. ``root`` is the source's folder (None: the source's default)."""

    model_config = ConfigDict(extra="forbid")

    source: str = "fashion_mnist"  # registered: data.registry.register_source, entry points
    root: Path | None = None
    # folder sources (image_folder, rival10) resize to this square size, None: 64;
    # fashion_mnist and cifar10 always keep their native size
    image_size: int | None = Field(None, gt=0)
    # image_folder: 1 = greyscale, 3 = RGB (None: 3); the classifier's input channels
    channels: Literal[1, 3] | None = None
    download: bool = False  # allow torchvision's download as a fallback (needs internet)
    # image_folder without train/ and test/ sub-folders: seeded per-class train/test split
    holdout_seed: int = 0
    holdout_fraction: float = Field(0.2, ge=0.0, lt=1.0)

    def cache_key(self) -> str:
        """The spec as JSON for cache keys: ``channels`` (added later) is left out while
        unset, so caches written before it existed stay valid."""
        return self.model_dump_json(exclude={"channels"} if self.channels is None else None)

    @field_validator("source")
    @classmethod
    def _registered(cls, name: str) -> str:
        from conceptguard.data.registry import known_sources  # the registry imports this

        known = known_sources()
        if name not in known:
            raise ValueError(f"unknown data source {name!r}; known: {known}")
        return name
