"""Fashion-MNIST from its IDX files.

Default location: ``/usr/share/datasets/fashion-mnist`` (Debian package
``dataset-fashion-mnist``). With ``download=True`` and no local copy, torchvision downloads the
raw files (to ``root``, or ``~/.cache/conceptguard/data`` when ``root`` is None); they are still
read with our own IDX reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conceptguard.data.base import ArrayDataset
from conceptguard.data.idx import read_idx

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CACHE_ROOT = Path.home() / ".cache" / "conceptguard" / "data"

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

#: split -> (images file stem, labels file stem); each may be stored with or without ``.gz``.
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_fashion_mnist(root: Path | None = None,
                       download: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    """Return (train, test) with images ``(N, 28, 28, 1)`` uint8 and labels 0..9."""
    folder = _find_folder(_candidate_folders(root))
    if folder is None:
        if not download:
            raise FileNotFoundError(_missing_message(root))
        folder = _download(root if root is not None else CACHE_ROOT)
    return _load_split(folder, "train"), _load_split(folder, "test")


def _candidate_folders(root: Path | None) -> list[Path]:
    bases = [Path(root)] if root is not None else [DEFAULT_ROOT, CACHE_ROOT]
    # torchvision's download puts the raw files under <root>/FashionMNIST/raw.
    return [folder for base in bases for folder in (base, base / "FashionMNIST" / "raw")]


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _find_folder(candidates: list[Path]) -> Path | None:
    stems = [stem for pair in FILES.values() for stem in pair]
    for folder in candidates:
        if all(_find_file(folder, stem) is not None for stem in stems):
            return folder
    return None


def _missing_message(root: Path | None) -> str:
    where = str(root) if root is not None else f"{DEFAULT_ROOT} or {CACHE_ROOT}"
    return (f"Fashion-MNIST IDX files not found in {where}: install them with "
            f"`apt-get install dataset-fashion-mnist`, point data.root at a folder holding "
            f"{', '.join(s + '.gz' for pair in FILES.values() for s in pair)}, "
            f"or set data.download=true")


def _download(target: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    target.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        FashionMNIST(str(target), train=train, download=True)
    folder = _find_folder([target / "FashionMNIST" / "raw"])
    if folder is None:
        raise FileNotFoundError(f"torchvision download left no IDX files under {target}")
    return folder


def _load_split(folder: Path, split: str) -> ArrayDataset:
    image_stem, label_stem = FILES[split]
    image_path, label_path = _find_file(folder, image_stem), _find_file(folder, label_stem)
    assert image_path is not None and label_path is not None  # checked by _find_folder
    images, labels = read_idx(image_path), read_idx(label_path)
    _check_arrays(images, labels, image_path, label_path)
    return ArrayDataset(f"fashion_mnist/{split}", images[..., None], labels.astype(np.int64),
                        list(FASHION_MNIST_CLASSES))


def _check_arrays(images: np.ndarray, labels: np.ndarray, image_path: Path,
                  label_path: Path) -> None:
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{image_path}: expected uint8 images (N, H, W), got "
                         f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{label_path}: {labels.shape} labels for {len(images)} images "
                         f"in {image_path}")
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: label {int(labels.max())} outside 0..9")
