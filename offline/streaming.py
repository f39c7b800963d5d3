"""The test split in bounded memory: served outputs streamed to a file, scores in batches.

The fit, reference and calibration splits have fixed sizes in the config, so they are decoded
into memory (:func:`split_datasets`). The test split is "the rest" and grows with the dataset:
its images are decoded batch by batch (:class:`~conceptguard.data.lazy.LazyImages`), the
served outputs (logits, features, concepts) of each batch are appended to a raw float32
file in a temporary folder (:func:`served_streamed`), and only per-image scalars stay in
memory (label, prediction; then the scores of :func:`score_streamed`, with the per-class
probabilities and per-concept contributions dropped). Stages that need full outputs for a
bounded subset (the VLM oracle's inputs, an attack's victims) read those rows back
(:meth:`StreamedOutputs.take`) with plain file reads: no memory map, so nothing but the rows
asked for enters the process's resident memory.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from conceptguard.calibration import Batch
from conceptguard.data import Dataset
from conceptguard.data.lazy import LazyImages
from conceptguard.data.splits import Splits
from conceptguard.runtime import OnnxRuntime
from conceptguard.scoring import Monitor, Scores, score
from offline.stages import IMAGE, served_outputs

SERVE_BATCH = 256  # images decoded and run through the graph at a time
SCORE_BATCH = 4096  # served outputs scored at a time
READ_CHUNK = 4096  # rows per file read
RECORD = ("logits", "features", "concepts")
Serve = Callable[[Any], Mapping[str, np.ndarray]]  # uint8 NHWC or lazy rows -> outputs
Scorer = Callable[[Batch], Scores]  # served outputs -> scores


def split_datasets(train: Dataset, test: Dataset, splits: Splits) -> dict[str, Dataset]:
    """fit, reference, calibration decoded into memory (bounded by the config); test as the
    source gives it (an undecoded index for a folder source, streamed by the stages)."""
    return {"fit": train.subset(splits.fit).load(),
            "reference": train.subset(splits.reference).load(),
            "calibration": train.subset(splits.calibration).load(),
            "test": test.subset(splits.test)}


class StreamedOutputs:
    """Served outputs of N inputs kept on disk: one float32 record per input (logits,
    features, concepts), labels and predictions in memory. Quacks like
    :class:`~conceptguard.calibration.Batch` where the stages need it (``predictions``,
    ``labels``, ``wrong``, ``select``, ``len``); full rows come from :meth:`take`."""

    def __init__(self, path: Path, widths: tuple[int, int, int], labels: np.ndarray,
                 predictions: np.ndarray, folder: tempfile.TemporaryDirectory | None = None):
        self.path = Path(path)
        self.widths = widths
        self.labels = np.asarray(labels, np.int64)
        self.predictions = np.asarray(predictions, np.int64)
        self._folder = folder  # removed with this object (or by close())

    @property
    def row_width(self) -> int:
        return sum(self.widths)

    @property
    def wrong(self) -> np.ndarray:
        return self.predictions != self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def _read(self, start: int, stop: int) -> np.ndarray:
        width = self.row_width
        with open(self.path, "rb") as f:
            f.seek(start * width * 4)
            rows = np.fromfile(f, np.float32, count=(stop - start) * width)
        if len(rows) != (stop - start) * width:
            raise OSError(f"{self.path}: truncated (rows {start}..{stop})")
        return rows.reshape(stop - start, width)

    def _batch(self, rows: np.ndarray, labels: np.ndarray) -> Batch:
        cuts = np.cumsum(self.widths)[:-1]
        logits, features, concepts = (np.ascontiguousarray(a) for a in
                                      np.split(rows, cuts, axis=1))
        return Batch(logits, features, concepts, labels)

    def take(self, indices: np.ndarray) -> Batch:
        """The full outputs of rows ``indices`` (in that order), read in chunks of
        contiguous rows; memory is that of the rows asked for."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(indices), self.row_width), np.float32)
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        i = 0
        while i < len(sorted_idx):
            start = int(sorted_idx[i])
            stop = min(start + READ_CHUNK, len(self))
            j = int(np.searchsorted(sorted_idx, stop))
            out[order[i:j]] = self._read(start, stop)[sorted_idx[i:j] - start]
            i = j
        return self._batch(out, self.labels[indices])

    def select(self, mask: np.ndarray) -> Batch:
        return self.take(np.flatnonzero(mask))

    def batches(self, batch_size: int = SCORE_BATCH) -> Iterator[Batch]:
        """Every row in order, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield self._batch(self._read(start, stop), self.labels[start:stop])

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def served_streamed(serve: OnnxRuntime | Serve, ds: Dataset, folder: Path,
                    batch_size: int = SERVE_BATCH) -> StreamedOutputs:
    """The exported serving graph over ``ds``, decoded ``batch_size`` images at a time; the
    outputs go to a file in a new temporary folder under ``folder``. ``serve``: the graph's
    runtime, or a function of images returning the served-outputs columns (the build passes
    its engine's ``served`` stage, so Ray runs it too, one chunk at a time). Lazy rows are
    passed undecoded, so an engine can have its workers read the files."""
    if isinstance(serve, OnnxRuntime):
        serve = partial(_serve_with, serve)
    if len(ds) == 0:
        raise ValueError("served_streamed: no images")
    Path(folder).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="served-", dir=folder)
    path = Path(tmp.name) / "outputs.f32"
    predictions = np.empty(len(ds), np.int64)
    widths: tuple[int, int, int] | None = None
    with open(path, "wb") as f:
        for start in range(0, len(ds), batch_size):
            out = serve(_view(ds.images, start, start + batch_size))
            parts = [np.asarray(out[k], np.float32) for k in RECORD]
            widths = widths or tuple(p.shape[1] for p in parts)  # type: ignore[assignment]
            np.concatenate(parts, axis=1).tofile(f)
            predictions[start:start + len(parts[0])] = parts[0].argmax(1)
        f.flush()
        os.fsync(f.fileno())
    assert widths is not None
    return StreamedOutputs(path, widths, ds.labels, predictions, tmp)


def slim(s: Scores) -> Scores:
    """``s`` without its per-class probabilities and per-concept contributions (zero-width
    arrays): what the evaluation reads is per-image scalars."""
    n = len(s)
    return dataclasses.replace(s, probabilities=np.empty((n, 0), np.float32),
                               contributions=np.empty((n, 0), np.float32))


def score_streamed(scorer: Monitor | Scorer, outs: StreamedOutputs | Batch,
                   batch_size: int = SCORE_BATCH) -> Scores:
    """:func:`conceptguard.scoring.score` over every row, ``batch_size`` rows at a time,
    slimmed (:func:`slim`). ``scorer``: the monitor, or a function of a batch of served
    outputs returning its scores (the build passes its engine's ``scoring`` stage)."""
    if isinstance(scorer, Monitor):
        scorer = partial(_score_with, scorer)
    if isinstance(outs, StreamedOutputs):
        batches: Iterator[Batch] = outs.batches(batch_size)
    else:
        batches = (outs.select(slice(i, i + batch_size)) for i in range(0, len(outs), batch_size))
    return Scores.concat([slim(scorer(b)) for b in batches])


def _serve_with(rt: OnnxRuntime, images: np.ndarray) -> Mapping[str, np.ndarray]:
    return served_outputs(rt, {IMAGE: np.asarray(images)})


def _view(images: np.ndarray | LazyImages, start: int, stop: int) -> np.ndarray | LazyImages:
    """Rows ``start:stop``: still undecoded for lazy images (the engine decides where they
    are decoded: here, or by a Ray worker that reads the files), a slice of an array."""
    if isinstance(images, LazyImages):
        return images.subset(np.arange(start, min(stop, len(images))))
    return images[start:stop]


def _score_with(monitor: Monitor, b: Batch) -> Scores:
    return score(monitor, b.logits, b.features, b.concepts)


def oracle_indices(outs: StreamedOutputs | Batch, first: int, max_misclassified: int | None,
                   seed: int) -> tuple[np.ndarray, int]:
    """Rows the VLM oracle embeds: the first ``first`` rows, plus the misclassified rows after
    them; more than ``max_misclassified`` of those: a seeded sample of that many. Returns the
    sorted rows and how many of them are the first block."""
    n_first = min(first, len(outs))
    wrong = np.flatnonzero(outs.predictions != outs.labels)
    rest = wrong[wrong >= n_first]
    if max_misclassified is not None and len(rest) > max_misclassified:
        rest = np.sort(np.random.default_rng(seed).choice(rest, max_misclassified,
                                                          replace=False))
    return np.concatenate([np.arange(n_first, dtype=np.int64), rest.astype(np.int64)]), n_first
