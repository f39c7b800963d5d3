"""Data sources: every source yields a (train, test) pair of :class:`ArrayDataset` (in memory)
or :class:`LazyDataset` (an index, decoded on demand); both share one interface."""

from conceptguard.data.base import ArrayDataset, DataSpec
from conceptguard.data.lazy import Dataset, LazyDataset, LazyImages
from conceptguard.data.registry import load_source, open_source
from conceptguard.data.splits import SplitSpec, make_splits

__all__ = ["ArrayDataset", "DataSpec", "Dataset", "LazyDataset", "LazyImages", "SplitSpec",
           "load_source", "make_splits", "open_source"]
