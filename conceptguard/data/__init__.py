"""Data sources: every source yields a (train, test) pair of :class:`ArrayDataset` (in memory)
or :class:`LazyDataset` (an index, decoded on demand); both share one interface."""

from conceptguard.data.base import ArrayDataset, DataSpec
from conceptguard.data.lazy import Dataset, LazyDataset, LazyImages
from conceptguard.data.registry import load_source, open_source
from conceptguard.data.splits import (
    DataMismatch,
    SplitSpec,
    check_same_data,
    make_splits,
    sample_digest,
)

__all__ = ["ArrayDataset", "DataMismatch", "DataSpec", "Dataset", "LazyDataset", "LazyImages",
           "SplitSpec", "check_same_data", "load_source", "make_splits", "open_source",
           "sample_digest"]
