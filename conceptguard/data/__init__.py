"""Data sources: every source yields :class:`ArrayDataset` pairs (train, test)."""

from conceptguard.data.base import ArrayDataset, DataSpec
from conceptguard.data.registry import load_source
from conceptguard.data.splits import SplitSpec, make_splits

__all__ = ["ArrayDataset", "DataSpec", "SplitSpec", "load_source", "make_splits"]
