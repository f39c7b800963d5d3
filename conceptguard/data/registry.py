"""One entry point from a :class:`DataSpec` to a (train, test) pair.

``open_source`` returns what the source gives: images in memory (:class:`ArrayDataset`:
Fashion-MNIST, CIFAR-10, RIVAL10, bounded by their files) or an index decoded on demand
(:class:`LazyDataset`: image folders of any size). ``load_source`` decodes both into memory.

Built in: ``fashion_mnist``, ``cifar10``, ``image_folder``, ``rival10``. Another package adds
one with :func:`register_source` or, without any code here, with an entry point in the
``conceptguard.data_sources`` group (:mod:`conceptguard.plugins`; the function it names may
carry ``downloadable = True``), found the first time the sources are listed or opened.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from conceptguard.data.base import ArrayDataset, DataSpec
from conceptguard.data.cifar10 import load_cifar10
from conceptguard.data.fashion_mnist import load_fashion_mnist
from conceptguard.data.image_folder import index_image_folder
from conceptguard.data.lazy import Dataset
from conceptguard.data.rival10 import load_rival10
from conceptguard.plugins import DATA_SOURCES, Discovery, EntryPointFactory

Loader = Callable[[DataSpec], tuple[Dataset, Dataset]]


def _fashion_mnist(spec: DataSpec) -> tuple[ArrayDataset, ArrayDataset]:
    return load_fashion_mnist(spec.root, spec.download)


def _cifar10(spec: DataSpec) -> tuple[ArrayDataset, ArrayDataset]:
    return load_cifar10(spec.root, spec.download)


def _image_folder(spec: DataSpec) -> tuple[Dataset, Dataset]:
    return index_image_folder(_required_root(spec), spec.image_size, spec.holdout_seed,
                              spec.holdout_fraction, spec.channels or 3)


def _rival10(spec: DataSpec) -> tuple[ArrayDataset, ArrayDataset]:
    return load_rival10(_required_root(spec), spec.image_size)


LOADERS: dict[str, Loader] = {
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "image_folder": _image_folder,
    "rival10": _rival10,
}
DOWNLOADABLE: set[str] = {"fashion_mnist", "cifar10"}  # may download into a new root


def register_source(name: str, loader: Loader, *, downloadable: bool = False,
                    overwrite: bool = False) -> None:
    """Make ``DataSpec(source=name)`` valid and ``load_source`` call ``loader(spec)``."""
    if not name:
        raise ValueError("source name must be non-empty")
    if name in LOADERS and not overwrite:
        raise ValueError(f"data source {name!r} is already registered")
    LOADERS[name] = loader
    if downloadable:
        DOWNLOADABLE.add(name)
    else:
        DOWNLOADABLE.discard(name)


_DISCOVERY = Discovery(DATA_SOURCES, LOADERS, register_source)


def load_entry_points(*, again: bool = False) -> list[str]:
    """Register the sources other packages declare (group ``conceptguard.data_sources``);
    done once, on first use, unless ``again``. The names added."""
    return _DISCOVERY.load(again=again)


def known_sources() -> list[str]:
    """Names of the registered sources (entry points included)."""
    load_entry_points()
    return sorted(LOADERS)


def _downloadable(name: str, loader: Loader) -> bool:
    if isinstance(loader, EntryPointFactory):
        return getattr(loader.target, "downloadable", False) is True
    return name in DOWNLOADABLE


def load_source(spec: DataSpec) -> tuple[ArrayDataset, ArrayDataset]:
    """The (train, test) pair that ``spec`` names, decoded into memory."""
    train, test = open_source(spec)
    return train.load(), test.load()


def open_source(spec: DataSpec) -> tuple[Dataset, Dataset]:
    """The (train, test) pair that ``spec`` names, as the source gives it (lazy or not)."""
    load_entry_points()
    loader = LOADERS.get(spec.source)
    if loader is None:
        raise ValueError(f"unknown data source {spec.source!r}; known: {sorted(LOADERS)}")
    may_create = spec.download and _downloadable(spec.source, loader)
    if spec.root is not None and not Path(spec.root).exists() and not may_create:
        where = "" if Path(spec.root).is_absolute() else \
            f" (a relative root resolves against the current folder, {Path.cwd()})"
        raise FileNotFoundError(f"data root {spec.root} for source {spec.source!r} does not "
                                f"exist{where}")
    return loader(spec)


def _required_root(spec: DataSpec) -> Path:
    if spec.root is None:
        raise ValueError(f"data source {spec.source!r} needs data.root (it has no default)")
    return Path(spec.root)
