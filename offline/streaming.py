"""Streaming: images and served outputs in bounded memory, a batch at a time.

Two streams, one module:

- **The test split's served outputs.** The fit, reference and calibration splits have fixed
  sizes in the config, so they are decoded into memory (:func:`split_datasets`). The test
  split is "the rest" and grows with the dataset: its images are decoded batch by batch
  (:class:`~conceptguard.data.lazy.LazyImages`), the served outputs (logits, features,
  concepts) of each batch are appended to a raw float32 file in a temporary folder
  (:func:`served_streamed`), and only per-image scalars stay in memory (label, prediction;
  then the scores of :func:`score_streamed`, with the per-class probabilities and
  per-concept contributions dropped). Stages that need full outputs for a bounded subset
  (the VLM oracle's inputs, an attack's victims) read those rows back
  (:meth:`StreamedOutputs.take`) with plain file reads: no memory map, so nothing but the
  rows asked for enters the process's resident memory.
- **Image files as column batches** for the per-image stages of :mod:`offline.stages`: an
  image folder or a Parquet file read batch by batch (:func:`iter_source`), a stage run over
  such a stream keeping only its outputs (:func:`run_streamed`). Ray Data reads the same
  files with the same decoding (:func:`decode_columns`, :mod:`offline.ray_data`). Rows carry
  an ``id`` (their position in the source: sorted relative paths for a folder, row order for
  Parquet) so results can be put back in order whichever engine produced them. Layouts: an
  image folder ``root/**/<image>`` (the suffixes and order of
  :func:`conceptguard.data.image_folder.list_images`; a file's first folder under ``root``
  is its class when ``classes`` is given, else the label is -1); Parquet: an ``image``
  column of encoded image bytes (PNG/JPEG), optionally ``label`` and ``id`` (row order when
  absent; Ray Data needs it, since its blocks may come back in any order:
  :func:`write_parquet` writes it).
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from conceptguard.calibration import Batch
from conceptguard.data import Dataset
from conceptguard.data.image_folder import list_images, load_image
from conceptguard.data.lazy import LazyImages
from conceptguard.data.splits import Splits
from conceptguard.runtime import OnnxRuntime
from conceptguard.scoring import Monitor, Scores, score
from offline.stages import IMAGE, Columns, served_outputs

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


# ------------------------------------------------------------------ image files as batches


def image_files(root: Path) -> list[Path]:
    """Every image under ``root``, in sorted relative-path order (the row order)."""
    files = list_images(Path(root))
    if not files:
        raise FileNotFoundError(f"no images under {root}")
    return files


def decode_row(data: bytes | np.ndarray, channels: int, name: str = "in the stream"
               ) -> np.ndarray:
    """Encoded bytes (or an already decoded array) -> uint8 ``(H, W, C)``, size unchanged,
    by the data sources' decoder (:func:`conceptguard.data.image_folder.load_image`: the
    same modes refused, with the same message)."""
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim >= 2:
        return data[..., None] if data.ndim == 2 else data
    return load_image(io.BytesIO(bytes(data)), None, channels, name=name)


def decode_columns(columns: Columns, channels: int) -> Columns:
    """Decode the ``image`` column (bytes or arrays) to uint8 NHWC; other columns pass."""
    images = np.stack([decode_row(x, channels) for x in columns[IMAGE]])
    return {**{k: np.asarray(v) for k, v in columns.items() if k != IMAGE}, IMAGE: images}


def folder_label(path: Path, root: Path, classes: Sequence[str] | None) -> int:
    """The class of an image file: the index in ``classes`` of its first folder under
    ``root``; -1 without ``classes`` or for a folder not among them."""
    if not classes:
        return -1
    rel = path.relative_to(root)
    name = rel.parts[0] if len(rel.parts) > 1 else ""
    return list(classes).index(name) if name in classes else -1


def iter_folder(root: Path, channels: int, batch_size: int = 256,
                classes: Sequence[str] | None = None) -> Iterator[Columns]:
    """Batches ``{id, label, image}`` of an image folder; one batch in memory at a time."""
    root = Path(root)
    files = image_files(root)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        yield {"id": np.arange(start, start + len(chunk), dtype=np.int64),
               "label": np.array([folder_label(p, root, classes) for p in chunk], np.int64),
               IMAGE: np.stack([decode_row(p.read_bytes(), channels, str(p)) for p in chunk])}


def iter_parquet(path: Path, channels: int, batch_size: int = 256) -> Iterator[Columns]:
    """Batches ``{id, label, image}`` of a Parquet file, read row group by row group."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    columns = [c for c in (IMAGE, "label", "id") if c in names]
    start = 0
    for rb in pf.iter_batches(batch_size=batch_size, columns=columns):
        n = rb.num_rows
        raw = rb.column(IMAGE).to_pylist()
        labels = (np.asarray(rb.column("label").to_numpy(zero_copy_only=False), np.int64)
                  if "label" in names else np.full(n, -1, np.int64))
        ids = (np.asarray(rb.column("id").to_numpy(zero_copy_only=False), np.int64)
               if "id" in names else np.arange(start, start + n, dtype=np.int64))
        yield {"id": ids, "label": labels,
               IMAGE: np.stack([decode_row(x, channels, f"{path} row {int(i)}")
                                for x, i in zip(raw, ids, strict=True)])}
        start += n


def iter_source(path: Path, channels: int, batch_size: int = 256,
                classes: Sequence[str] | None = None) -> Iterator[Columns]:
    """A folder or a ``.parquet`` file, streamed."""
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet":
        return iter_parquet(path, channels, batch_size)
    return iter_folder(path, channels, batch_size, classes)


def write_parquet(path: Path, images: np.ndarray, labels: np.ndarray,
                  rows_per_group: int = 1024) -> Path:
    """uint8 NHWC images (and labels) as a Parquet file of PNG bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
        return buf.getvalue()

    table = pa.table({"id": pa.array(np.arange(len(images), dtype=np.int64)),
                      IMAGE: pa.array([png(a) for a in images], pa.binary()),
                      "label": pa.array(np.asarray(labels, np.int64))})
    pq.write_table(table, path, row_group_size=rows_per_group)
    return Path(path)


def run_streamed(fn: Callable[[Columns], Columns], batches: Iterator[Columns]) -> Columns:
    """A per-image stage over a stream of batches; only its (small) outputs are kept, not
    the images."""
    parts = [fn(b) for b in batches]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
