"""RIVAL10 (Moayeri et al., CVPR 2022): 10 classes with 18 binary visual attributes per image.

The public release stores ``RIVAL10/{train,test}/ordinary/<id>.JPEG`` with per-image attribute
labels and segmentation masks in side files, and the class labels through metadata mapping files.
It cannot be downloaded here, so this loader reads **our own documented layout**, into which the
release is converted once:

* ``root/{train,test}/<class>/<name>.(jpg|jpeg|png)`` (suffix case-insensitive), ``<class>`` one
  of :data:`RIVAL10_CLASSES`;
* ``root/{train,test}/attributes.json`` mapping ``"<class>/<name>.<ext>"`` to either a list of
  the attribute names present, or a dict ``attribute -> 0/1`` (attributes left out are 0).

Labels index :data:`RIVAL10_CLASSES` in its order (not sorted by name); ``attributes`` is
``(N, 18)`` uint8 in the order of :data:`RIVAL10_ATTRIBUTES`. Images are RGB, resized to a
square ``image_size`` (default 64) with bilinear filtering.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from conceptguard.data.base import ArrayDataset
from conceptguard.data.image_folder import DEFAULT_IMAGE_SIZE, load_images

RIVAL10_CLASSES = ["truck", "car", "plane", "ship", "cat", "dog", "equine", "deer", "frog", "bird"]
RIVAL10_ATTRIBUTES = ["long-snout", "wings", "wheels", "text", "horns", "floppy-ears", "ears",
                      "colored-eyes", "tail", "mane", "beak", "hairy", "metallic", "rectangular",
                      "wet", "long", "tall", "patterned"]
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
ATTRIBUTES_FILE = "attributes.json"


def load_rival10(root: Path, image_size: int | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """Return (train, test) with images ``(N, S, S, 3)`` uint8 and attributes ``(N, 18)``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"RIVAL10 root {root} does not exist or is not a folder")
    size = image_size or DEFAULT_IMAGE_SIZE
    return (load_rival10_split(root / "train", size, "rival10/train"),
            load_rival10_split(root / "test", size, "rival10/test"))


def load_rival10_split(folder: Path, size: int, name: str) -> ArrayDataset:
    """One split folder (``<class>/`` sub-folders plus ``attributes.json``)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"RIVAL10 split folder {folder} does not exist")
    files = list_split_files(folder)
    if not files:
        raise ValueError(f"{folder}: no RIVAL10 images found")
    table = read_attribute_file(folder / ATTRIBUTES_FILE)
    keys = [f"{path.parent.name}/{path.name}" for path, _ in files]
    missing = [key for key in keys if key not in table]
    if missing:
        raise ValueError(f"{folder / ATTRIBUTES_FILE}: no attribute entry for {len(missing)} "
                         f"image(s), e.g. {missing[:3]}")
    images = load_images([path for path, _ in files], size, desc=name)
    labels = np.array([label for _, label in files], dtype=np.int64)
    attributes = np.stack([table[key] for key in keys])
    return ArrayDataset(name, images, labels, list(RIVAL10_CLASSES), attributes,
                        list(RIVAL10_ATTRIBUTES))


def list_split_files(folder: Path) -> list[tuple[Path, int]]:
    """(image path, class index) for every image in the class sub-folders, sorted per class."""
    present = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = sorted(set(present) - set(RIVAL10_CLASSES))
    if unknown:
        raise ValueError(f"{folder}: unknown RIVAL10 class folders {unknown}; "
                         f"expected a subset of {RIVAL10_CLASSES}")
    return [(path, label) for label, cls in enumerate(RIVAL10_CLASSES)
            if (folder / cls).is_dir() for path in _class_images(folder / cls)]


def read_attribute_file(path: Path) -> dict[str, np.ndarray]:
    """``attributes.json`` -> ``{"<class>/<file>": (18,) uint8 vector}``."""
    if not path.is_file():
        raise FileNotFoundError(f"RIVAL10 attribute file {path} not found")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object mapping image paths to attributes")
    return {key: attribute_vector(value, f"{path}[{key!r}]") for key, value in table.items()}


def attribute_vector(value: Any, where: str) -> np.ndarray:
    """A list of present attribute names, or a dict name -> 0/1, as an ``(18,)`` uint8 vector."""
    vector = np.zeros(len(RIVAL10_ATTRIBUTES), dtype=np.uint8)
    if isinstance(value, list):
        if not all(isinstance(name, str) for name in value):
            raise ValueError(f"{where}: attribute names must be strings, got {value!r}")
        items = dict.fromkeys(value, 1)
    elif isinstance(value, dict):
        items = value
    else:
        raise ValueError(f"{where}: expected a list of attribute names or a dict, got "
                         f"{type(value).__name__}")
    for attr, flag in items.items():
        if attr not in RIVAL10_ATTRIBUTES:
            raise ValueError(f"{where}: unknown attribute {attr!r}")
        if flag not in (0, 1):  # True/False compare equal to 1/0
            raise ValueError(f"{where}: attribute {attr!r} must be 0 or 1, got {flag!r}")
        vector[RIVAL10_ATTRIBUTES.index(attr)] = int(flag)
    return vector


def _class_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))
