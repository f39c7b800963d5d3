"""CIFAR-10 from the official **binary** release (never the pickled python version).

Layout: ``cifar-10-batches-bin/{data_batch_1..5.bin, test_batch.bin, batches.meta.txt}``; each
record is one label byte followed by 3072 bytes of a 32x32 image in CHW order. ``root`` may be
that folder or its parent; None means ``~/.cache/conceptguard/data``. With ``download=True``
and no local copy the binary archive is fetched (MD5-checked) and extracted there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conceptguard.data.base import ArrayDataset

CACHE_ROOT = Path.home() / ".cache" / "conceptguard" / "data"
FOLDER_NAME = "cifar-10-batches-bin"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILES = ["test_batch.bin"]
META_FILE = "batches.meta.txt"
SIDE, CHANNELS = 32, 3
RECORD_BYTES = 1 + SIDE * SIDE * CHANNELS


def load_cifar10(root: Path | None = None,
                 download: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    """Return (train, test) with images ``(N, 32, 32, 3)`` uint8 and labels 0..9."""
    base = Path(root) if root is not None else CACHE_ROOT
    folder = find_batches_folder(base)
    if folder is None:
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 binary batches not found in {base} or {base / FOLDER_NAME} "
                f"(need {', '.join(TRAIN_FILES + TEST_FILES)}); extract "
                f"cifar-10-binary.tar.gz there or set data.download=true")
        folder = _download(base)
    classes = read_class_names(folder)
    train = _load_batches(folder, TRAIN_FILES, classes, "cifar10/train")
    test = _load_batches(folder, TEST_FILES, classes, "cifar10/test")
    return train, test


def find_batches_folder(root: Path) -> Path | None:
    """The folder holding the batch files: ``root`` itself or ``root/cifar-10-batches-bin``."""
    for folder in (root, root / FOLDER_NAME):
        if all((folder / name).is_file() for name in TRAIN_FILES + TEST_FILES):
            return folder
    return None


def read_class_names(folder: Path) -> list[str]:
    """Class names from ``batches.meta.txt`` (one per line); the standard ten if it is absent."""
    meta = folder / META_FILE
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    names = [line.strip() for line in meta.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name]
    if len(names) != len(CIFAR10_CLASSES):
        raise ValueError(f"{meta}: expected {len(CIFAR10_CLASSES)} class names, "
                         f"found {len(names)}")
    return names


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch file -> (images ``(N, 32, 32, 3)`` uint8, labels int64)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise ValueError(f"{path}: size {raw.size} bytes is not a positive multiple of the "
                         f"{RECORD_BYTES}-byte CIFAR-10 record (truncated or not a batch file)")
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    images = records[:, 1:].reshape(-1, CHANNELS, SIDE, SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _load_batches(folder: Path, names: list[str], classes: list[str], name: str) -> ArrayDataset:
    parts = [read_batch(folder / file) for file in names]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    if len(labels) and int(labels.max()) >= len(classes):
        raise ValueError(f"{folder}: label {int(labels.max())} outside 0..{len(classes) - 1}")
    return ArrayDataset(name, images, labels, classes)


def _download(base: Path) -> Path:
    from torchvision.datasets.utils import download_and_extract_archive

    base.mkdir(parents=True, exist_ok=True)
    download_and_extract_archive(ARCHIVE_URL, str(base), md5=ARCHIVE_MD5)
    folder = find_batches_folder(base)
    if folder is None:
        raise FileNotFoundError(f"the CIFAR-10 archive extracted into {base} lacks the batches")
    return folder
