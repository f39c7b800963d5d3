"""Pure helpers that write small generated datasets to disk, in each source's real layout.

Each ``make_*`` writes into the given folder and returns the arrays a loader should give back.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise ``array`` as IDX (big-endian dims and data)."""
    big = array.astype(array.dtype.newbyteorder(">"))
    code = IDX_CODES[big.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + big.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def make_fashion_mnist(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0,
                       compress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four Fashion-MNIST IDX files; returns split -> (images (N,28,28), labels)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        out[split] = (images, labels)
    return out


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: label byte + CHW pixels, from HWC images."""
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels.astype(np.uint8)[:, None], chw], axis=1).tobytes()


def make_cifar10(root: Path, per_batch: int = 3, n_test: int = 4, seed: int = 0,
                 classes: list[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/cifar-10-batches-bin`` with 5 train batches and a test batch."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    names = classes or ["airplane", "automobile", "bird", "cat", "deer",
                        "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    batches = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    parts = []
    for name in batches:
        n = n_test if name == "test_batch.bin" else per_batch
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (folder / name).write_bytes(cifar_records(images, labels))
        parts.append((images, labels))
    train = parts[:5]
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    return {"train": (train_images, train_labels), "test": parts[5]}


def random_image(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_image_folder(root: Path, classes: list[str], per_class: int = 3, size: int = 16,
                      split: bool = True, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """PNGs in ``root/{train,test}/<class>/`` (or ``root/<class>/`` when not ``split``).

    Returns folder -> {"<class>/<file>": pixels}; a stray ``notes.txt`` goes in every class.
    """
    rng = np.random.default_rng(seed)
    folders = ["train", "test"] if split else [""]
    out: dict[str, dict[str, np.ndarray]] = {}
    for folder in folders:
        out[folder] = {}
        for cls in classes:
            for i in range(per_class):
                pixels = random_image(rng, size)
                write_png(root / folder / cls / f"img_{i:02d}.png", pixels)
                out[folder][f"{cls}/img_{i:02d}.png"] = pixels
            (root / folder / cls / "notes.txt").write_text("not an image")
    return out


def make_rival10(root: Path, classes: list[str], per_class: int = 2, size: int = 16,
                 seed: int = 0, attribute_names: list[str] | None = None,
                 as_dict: bool = False) -> dict[str, dict[str, tuple[np.ndarray, list[str]]]]:
    """Our RIVAL10 layout: PNG images per class folder plus ``attributes.json`` per split.

    Returns split -> {"<class>/<file>": (pixels, present attribute names)}.
    """
    rng = np.random.default_rng(seed)
    names = attribute_names or ["wings", "tail", "metallic", "ears", "patterned"]
    out: dict[str, dict[str, tuple[np.ndarray, list[str]]]] = {}
    for split in ("train", "test"):
        out[split] = {}
        for cls in classes:
            for i in range(per_class):
                pixels = random_image(rng, size)
                key = f"{cls}/{split}_{i:02d}.png"
                write_png(root / split / key, pixels)
                present = [n for n in names if rng.random() < 0.5]
                out[split][key] = (pixels, present)
        write_attributes(root / split / "attributes.json",
                         {k: present for k, (_, present) in out[split].items()}, names, as_dict)
    return out


def write_attributes(path: Path, table: dict[str, list[str]], names: list[str],
                     as_dict: bool = False) -> Path:
    """``attributes.json``: key -> list of present names, or key -> {name: 0/1}."""
    if as_dict:
        payload = {k: {n: int(n in present) for n in names} for k, present in table.items()}
    else:
        payload = {k: list(present) for k, present in table.items()}
    path.write_text(json.dumps(payload, indent=1))
    return path
