"""Images in a torchvision-style ImageFolder tree, indexed without decoding.

``root/{train,test}/<class>/<image files>``, or without train/test subfolders
``root/<class>/<image files>``, which is then split per class into train/test by a seeded,
deterministic shuffle (default 80/20). Classes are the sorted sub-folder names; files whose
suffix is not an image suffix are skipped (class folders are searched recursively). Images are
converted to RGB (``channels=1``: greyscale) and resized to a square ``image_size`` (default
64) with bilinear filtering.

:func:`index_image_folder` returns :class:`~conceptguard.data.lazy.LazyDataset` pairs: the
index is the root plus one UTF-8 relative path (``bytes``) and one int64 label per image,
about ``len(path) + 8`` bytes an image; pixels are decoded only for the rows a stage asks for.
:func:`load_image_folder` decodes everything (small folders, tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from conceptguard.data.base import ArrayDataset
from conceptguard.data.lazy import LazyDataset, LazyImages

DEFAULT_IMAGE_SIZE = 64
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm"})
SPLITS = ("train", "test")
MODES = {1: "L", 3: "RGB"}
DECODE_THREADS = 8


def index_image_folder(root: Path, image_size: int | None = None, seed: int = 0,
                       test_fraction: float = 0.2, channels: int = 3
                       ) -> tuple[LazyDataset, LazyDataset]:
    """(train, test) indexes of images ``(N, S, S, channels)`` uint8, S = image_size or 64."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist or is not a folder")
    if channels not in MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    size = image_size or DEFAULT_IMAGE_SIZE
    classes, (train_paths, train_labels), (test_paths, test_labels) = _index(
        root, seed, test_fraction)
    return (_lazy(f"image_folder/{root.name}/train", root, train_paths, train_labels, classes,
                  size, channels),
            _lazy(f"image_folder/{root.name}/test", root, test_paths, test_labels, classes,
                  size, channels))


def split_files(root: Path, seed: int = 0, test_fraction: float = 0.2
                ) -> tuple[list[str], dict[str, tuple[list[Path], np.ndarray]]]:
    """``(classes, {"train": (files, labels), "test": (files, labels)})``: the files behind
    :func:`index_image_folder`'s rows, in its order (row ``i`` of a split is file ``i``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist or is not a folder")
    classes, train, test = _index(root, seed, test_fraction)
    return classes, {name: ([root / os.fsdecode(p) for p in paths.tolist()], labels)
                     for name, (paths, labels) in (("train", train), ("test", test))}


def _index(root: Path, seed: int, test_fraction: float
           ) -> tuple[list[str], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Classes, (train paths, labels), (test paths, labels); paths relative to ``root``."""
    has_train, has_test = ((root / split).is_dir() for split in SPLITS)
    if has_train != has_test:
        raise ValueError(f"{root}: has only one of the train/ and test/ sub-folders")
    if has_train:
        classes = list_classes(root / "train")
        extra = sorted(set(_subfolders(root / "test")) - set(classes))
        if extra:
            raise ValueError(f"{root / 'test'}: classes {extra} do not exist in {root / 'train'}")
        train_paths, train_labels = index_files(root, "train", classes)
        test_paths, test_labels = index_files(root, "test", classes)
    else:
        classes = list_classes(root)
        paths, labels = index_files(root, "", classes)
        train_idx, test_idx = holdout_indices(labels, seed, test_fraction)
        train_paths, train_labels = paths[train_idx], labels[train_idx]
        test_paths, test_labels = paths[test_idx], labels[test_idx]
    if not len(train_paths):
        raise ValueError(f"{root}: no image files found")
    _check_no_empty_class(root / "train" if has_train else root, classes, train_labels)
    if has_train:  # a class the test part lacks could not be evaluated
        _check_no_empty_class(root / "test", classes, test_labels)
    return classes, (train_paths, train_labels), (test_paths, test_labels)


def load_image_folder(root: Path, image_size: int | None = None, seed: int = 0,
                      test_fraction: float = 0.2, channels: int = 3
                      ) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) decoded into memory: :func:`index_image_folder` then ``load()``."""
    train, test = index_image_folder(root, image_size, seed, test_fraction, channels)
    return train.load(), test.load()


def list_classes(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``folder``."""
    classes = _subfolders(folder)
    if not classes:
        raise ValueError(f"{folder}: no class sub-folders")
    return classes


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files skipped)."""
    return [folder / rel for rel in _relative_images(str(folder))]


def index_files(root: Path, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Relative paths (``bytes``, from ``root``) and labels of every image of ``split``
    (``""``: no split folder), class by class in sorted path order. Built one class at a time,
    so listing a large folder never holds more than one class's names as Python strings."""
    base = os.path.join(str(root), split) if split else str(root)
    paths: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for label, name in enumerate(classes):
        folder = os.path.join(base, name)
        if not os.path.isdir(folder):
            continue
        prefix = os.path.join(split, name) if split else name
        rel = [os.fsencode(os.path.join(prefix, r)) for r in _relative_images(folder)]
        paths.append(np.array(rel, dtype=bytes) if rel else np.empty(0, "S1"))
        labels.append(np.full(len(rel), label, np.int64))
    if not paths:
        return np.empty(0, "S1"), np.empty(0, np.int64)
    width = max(p.dtype.itemsize for p in paths)
    return (np.concatenate([p.astype(f"S{width}") for p in paths]),
            np.concatenate(labels))


def holdout_indices(labels: np.ndarray, seed: int, test_fraction: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded split of positions: ``round(test_fraction * n_class)`` of each class
    (classes in increasing label order, members in index order) go to test."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = rng.permutation(len(members))
        test[members[order[:round(test_fraction * len(members))]]] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def holdout_split(files: Sequence[tuple[Path, int]], seed: int,
                  test_fraction: float) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """:func:`holdout_indices` on a list of ``(path, label)`` sorted by label."""
    train, test = holdout_indices(np.array([label for _, label in files], np.int64), seed,
                                  test_fraction)
    return [files[i] for i in train], [files[i] for i in test]


def load_image(path: Path | str | bytes, size: int | None, channels: int = 3,
               name: str | None = None) -> np.ndarray:
    """One image (a file path, or an open binary file with ``name`` to call it by) as uint8
    ``(size, size, channels)`` (``size`` None: as stored); ``ValueError`` naming the file if
    unreadable, or in a mode the service refuses too (16-bit or float pixels, which an
    8-bit conversion would clip: :data:`conceptguard.imaging.SUPPORTED_MODES`). The one
    decoder of image files for the data sources and the offline streams."""
    from conceptguard.imaging import SUPPORTED_MODES

    shown = name or (os.fsdecode(path) if isinstance(path, bytes) else path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            converted = (image.convert(MODES[channels]) if mode in SUPPORTED_MODES
                         else None)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {shown}: {error}") from error
    if converted is None:
        raise ValueError(f"cannot read image {shown}: its mode {mode!r} (e.g. 16-bit or "
                         f"float pixels) is not supported, here or by the service; convert "
                         f"the images to 8 bits per channel")
    if size is not None and converted.size != (size, size):
        converted = converted.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(converted, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def load_images(paths: Sequence[Path | str | bytes], size: int, desc: str | None = None,
                channels: int = 3) -> np.ndarray:
    """Decode ``paths`` in a thread pool into one ``(N, size, size, channels)`` uint8 array
    (a progress bar when ``desc`` is given)."""
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    if not len(paths):
        return out
    workers = min(DECODE_THREADS, os.cpu_count() or 1, len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = pool.map(lambda p: load_image(p, size, channels), paths)
        for i, array in enumerate(tqdm(decoded, total=len(paths), desc=desc, unit="img",
                                       disable=None if desc else True, leave=False)):
            out[i] = array
    return out


class FolderReader:
    """Decodes rows of a folder index: ``reader(indices)`` -> uint8 NHWC."""

    def __init__(self, root: Path, paths: np.ndarray, size: int, channels: int):
        self.root = os.fsencode(str(root))
        self.paths = paths
        self.size = size
        self.channels = channels

    def locate(self, indices: np.ndarray) -> np.ndarray:
        """The files of rows ``indices`` (absolute paths, bytes)."""
        return np.array([os.path.join(self.root, p) for p in self.paths[indices].tolist()],
                        dtype=object)

    @property
    def decoder(self) -> partial:
        """Decodes a list of :meth:`locate` paths (picklable, without the index)."""
        return partial(load_images, size=self.size, channels=self.channels)

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        return self.decoder(self.locate(indices).tolist())


def _lazy(name: str, root: Path, paths: np.ndarray, labels: np.ndarray, classes: list[str],
          size: int, channels: int) -> LazyDataset:
    reader = FolderReader(root, paths, size, channels)
    return LazyDataset(name, LazyImages(reader, (len(paths), size, size, channels)), labels,
                       classes)


def _relative_images(folder: str) -> list[str]:
    """Image files under ``folder`` relative to it, sorted as paths (part by part)."""
    found: list[str] = []
    for current, dirs, files in os.walk(folder):
        dirs.sort()
        rel_dir = os.path.relpath(current, folder)
        for name in files:
            if (name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS
                    or not os.path.isfile(os.path.join(current, name))):
                continue
            found.append(name if rel_dir == "." else os.path.join(rel_dir, name))
    found.sort(key=lambda r: r.split(os.sep))
    return found


def _check_no_empty_class(folder: Path, classes: list[str], labels: np.ndarray) -> None:
    """Every class sub-folder must hold images (a class without any cannot be monitored)."""
    counts = np.bincount(labels, minlength=len(classes))
    empty = [name for name, n in zip(classes, counts, strict=True) if n == 0]
    missing = [name for name in empty if not (folder / name).is_dir()]
    if missing:  # a split folder (test/, say) without a class the other one has
        raise ValueError(f"{folder}: class folder(s) {missing} are missing; every split "
                         f"needs a folder for each class {classes}")
    if empty:
        raise ValueError(f"{folder}: class folder(s) {empty} hold no images "
                         f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove them")


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
