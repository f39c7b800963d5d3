"""Datasets whose images are decoded only when rows are asked for.

A :class:`LazyDataset` holds an index (labels and whatever its reader needs to find a row,
such as relative file paths) but no pixels; ``images[rows]`` decodes exactly those rows.
Splits select indices (:meth:`LazyDataset.subset` composes them without decoding) and a stage
either loads a bounded split into memory (:meth:`LazyDataset.load`) or streams a large one
slice by slice (``images[i:i + batch]``). :class:`~conceptguard.data.base.ArrayDataset` has
the same interface (``load`` returns itself), so every source goes through one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from conceptguard.data.base import ArrayDataset, check_labels

#: ``read(indices)`` -> uint8 ``(len(indices), H, W, C)``, rows in the order asked for.
RowReader = Callable[[np.ndarray], np.ndarray]
#: ``decode(paths)`` -> uint8 ``(len(paths), H, W, C)`` (see :meth:`LazyImages.files`).
FileDecoder = Callable[[Sequence[bytes]], np.ndarray]

LOAD_CHUNK = 1024  # rows decoded per call while loading a split into memory


class LazyImages:
    """Array-like uint8 ``(N, H, W, C)`` images; indexing (an int, a slice, an integer or
    boolean index array) decodes only the rows it selects and returns a numpy array.

    ``decoded`` counts the rows decoded so far (across subsets sharing the reader)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, read: RowReader, shape: tuple[int, int, int, int],
                 rows: np.ndarray | None = None, counter: list[int] | None = None):
        self._read = read
        self._item_shape = tuple(int(s) for s in shape[1:])
        self._rows = None if rows is None else np.asarray(rows, np.int64)
        self._n = int(shape[0]) if rows is None else len(self._rows)
        self._counter = counter if counter is not None else [0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n, *self._item_shape)

    @property
    def decoded(self) -> int:
        return self._counter[0]

    def files(self) -> tuple[np.ndarray, FileDecoder] | None:
        """Where this view's rows are stored, when the reader reads files: one path per row
        and the small picklable function that decodes a list of such paths, so another
        process (a Ray worker) can read and decode them itself. None for other readers."""
        locate = getattr(self._read, "locate", None)
        if locate is None:
            return None
        return locate(self._source_rows(np.arange(self._n))), self._read.decoder

    def __len__(self) -> int:
        return self._n

    def _positions(self, key: object) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(*key.indices(self._n), dtype=np.int64)
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (self._n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {self._n} rows")
            return np.flatnonzero(idx)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"cannot index lazy images with {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        if len(idx) and (idx.min() < -self._n or idx.max() >= self._n):
            raise IndexError(f"index out of range for {self._n} rows")
        return np.where(idx < 0, idx + self._n, idx)

    def _source_rows(self, positions: np.ndarray) -> np.ndarray:
        return positions if self._rows is None else self._rows[positions]

    def __getitem__(self, key: object) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        positions = self._positions(key)
        if len(positions) == 0:
            return np.empty((0, *self._item_shape), np.uint8)
        out = self._read(self._source_rows(positions))
        self._counter[0] += len(positions)
        if out.shape != (len(positions), *self._item_shape) or out.dtype != np.uint8:
            raise ValueError(f"row reader returned {out.dtype} {out.shape}, expected uint8 "
                             f"{(len(positions), *self._item_shape)}")
        return out

    def subset(self, indices: np.ndarray) -> LazyImages:
        """The rows ``indices`` (positions in this view), still undecoded."""
        positions = self._positions(indices)
        return LazyImages(self._read, (len(positions), *self._item_shape),
                          self._source_rows(positions), self._counter)

    def __array__(self, dtype=None, copy=None):  # np.asarray(lazy): decodes every row
        out = self.load()
        return out if dtype is None else out.astype(dtype)

    def load(self, chunk: int = LOAD_CHUNK) -> np.ndarray:
        """Every row decoded into one array (``chunk`` rows per reader call)."""
        out = np.empty(self.shape, np.uint8)
        for start in range(0, self._n, chunk):
            out[start:start + chunk] = self[start:start + chunk]
        return out


@dataclass(frozen=True)
class LazyDataset:
    """:class:`ArrayDataset`'s interface over :class:`LazyImages`: labels (and attributes)
    in memory, images decoded on demand."""

    name: str
    images: LazyImages
    labels: np.ndarray
    classes: list[str]
    attributes: np.ndarray | None = None
    attribute_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_labels(self.name, self.labels, len(self.images), len(self.classes))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> LazyDataset:
        """The rows ``indices``; nothing is decoded."""
        indices = np.asarray(indices)
        attrs = None if self.attributes is None else self.attributes[indices]
        return LazyDataset(self.name, self.images.subset(indices), self.labels[indices],
                           self.classes, attrs, self.attribute_names)

    def load(self) -> ArrayDataset:
        """Every row decoded: for splits of bounded size."""
        return ArrayDataset(self.name, self.images.load(), self.labels, self.classes,
                            self.attributes, self.attribute_names)


#: What a source returns: images in memory, or an index decoded on demand.
Dataset = ArrayDataset | LazyDataset
