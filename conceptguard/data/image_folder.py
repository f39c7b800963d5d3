"""Images in a torchvision-style ImageFolder tree.

``root/{train,test}/<class>/<image files>``, or without train/test subfolders
``root/<class>/<image files>``, which is then split per class into train/test by a seeded,
deterministic shuffle (default 80/20). Classes are the sorted sub-folder names; files whose
suffix is not an image suffix are skipped (class folders are searched recursively). Images are
converted to RGB and resized to a square ``image_size`` (default 64) with bilinear filtering.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from conceptguard.data.base import ArrayDataset

DEFAULT_IMAGE_SIZE = 64
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm"})
SPLITS = ("train", "test")


def load_image_folder(root: Path, image_size: int | None = None, seed: int = 0,
                      test_fraction: float = 0.2) -> tuple[ArrayDataset, ArrayDataset]:
    """Return (train, test) with images ``(N, S, S, 3)`` uint8, S = image_size or 64."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist or is not a folder")
    size = image_size or DEFAULT_IMAGE_SIZE
    has_train, has_test = ((root / split).is_dir() for split in SPLITS)
    if has_train != has_test:
        raise ValueError(f"{root}: has only one of the train/ and test/ sub-folders")
    if has_train:
        train_files, test_files, classes = _split_layout(root)
    else:
        classes = list_classes(root)
        files = _labelled_files(root, classes)
        train_files, test_files = holdout_split(files, seed, test_fraction)
    if not train_files:
        raise ValueError(f"{root}: no image files found")
    return (_build(f"image_folder/{root.name}/train", train_files, classes, size),
            _build(f"image_folder/{root.name}/test", test_files, classes, size))


def list_classes(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``folder``."""
    classes = _subfolders(folder)
    if not classes:
        raise ValueError(f"{folder}: no class sub-folders")
    return classes


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files skipped)."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def holdout_split(files: Sequence[tuple[Path, int]], seed: int,
                  test_fraction: float) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Per-class seeded split: ``round(test_fraction * n_class)`` files of each class to test."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for label in sorted({label for _, label in files}):
        members = [item for item in files if item[1] == label]
        order = rng.permutation(len(members))
        n_test = round(test_fraction * len(members))
        test_idx = set(order[:n_test].tolist())
        for i, item in enumerate(members):
            (test if i in test_idx else train).append(item)
    return train, test


def load_image(path: Path, size: int) -> np.ndarray:
    """One image as RGB uint8 ``(size, size, 3)``; ``ValueError`` naming the file if unreadable."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def load_images(paths: Sequence[Path], size: int, desc: str) -> np.ndarray:
    """Decode ``paths`` in a thread pool into one ``(N, size, size, 3)`` uint8 array."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = pool.map(lambda p: load_image(p, size), paths)
        for i, array in enumerate(tqdm(decoded, total=len(paths), desc=desc, unit="img",
                                       disable=None, leave=False)):
            out[i] = array
    return out


def _split_layout(root: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]], list[str]]:
    classes = list_classes(root / "train")
    extra = sorted(set(_subfolders(root / "test")) - set(classes))
    if extra:
        raise ValueError(f"{root / 'test'}: classes {extra} do not exist in {root / 'train'}")
    return (_labelled_files(root / "train", classes),
            _labelled_files(root / "test", classes), classes)


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _labelled_files(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    return [(path, label) for label, name in enumerate(classes)
            if (folder / name).is_dir() for path in list_images(folder / name)]


def _build(name: str, files: list[tuple[Path, int]], classes: list[str],
           size: int) -> ArrayDataset:
    images = load_images([path for path, _ in files], size, desc=name)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return ArrayDataset(name, images, labels, classes)
