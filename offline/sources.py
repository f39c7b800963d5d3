"""Streaming data sources for the per-image stages: an image folder or a Parquet file, read
batch by batch so that memory stays bounded by the batch, not the dataset.

Both engines read the same files with the same decoding (:func:`decode_batch`): the single
process iterates :func:`iter_batches`; Ray Data reads them with ``read_images`` /
``read_parquet`` (:mod:`offline.ray_data`). Rows carry an ``id`` (their position in the
source: sorted relative paths for a folder, row order for Parquet) so results can be put
back in order whichever engine produced them.

Layouts:
- image folder: ``root/**/*.{png,jpg,jpeg}``; a file's parent folder name is its class when
  ``classes`` is given (``root/<class>/<file>``), else the label is -1;
- Parquet: an ``image`` column of encoded image bytes (PNG/JPEG), optionally ``label`` and
  ``id`` (row order when absent; Ray Data needs it, since its blocks may come back in any
  order: :func:`write_parquet` writes it).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from offline.stages import IMAGE, Batch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def mode_for(channels: int) -> str:
    return {1: "L", 3: "RGB"}[channels]


def image_files(root: Path) -> list[Path]:
    """Every image under ``root``, in sorted relative-path order (the row order)."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files


def decode(data: bytes | np.ndarray, channels: int) -> np.ndarray:
    """Encoded bytes (or an already decoded array) -> uint8 ``(H, W, C)``."""
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim >= 2:
        arr = data
    else:
        with Image.open(io.BytesIO(bytes(data))) as img:
            arr = np.asarray(img.convert(mode_for(channels)))
    return arr[..., None] if arr.ndim == 2 else arr


def decode_batch(batch: Batch, channels: int) -> Batch:
    """Decode the ``image`` column of a batch (bytes or arrays) to uint8 NHWC."""
    images = np.stack([decode(x, channels) for x in batch[IMAGE]])
    return {**{k: np.asarray(v) for k, v in batch.items() if k != IMAGE}, IMAGE: images}


def label_of(path: Path, root: Path, classes: Sequence[str] | None) -> int:
    if not classes:
        return -1
    rel = path.relative_to(root)
    name = rel.parts[0] if len(rel.parts) > 1 else ""
    return list(classes).index(name) if name in classes else -1


def iter_folder(root: Path, channels: int, batch_size: int = 256,
                classes: Sequence[str] | None = None) -> Iterator[Batch]:
    """Batches ``{id, label, image}`` of an image folder; one batch in memory at a time."""
    root = Path(root)
    files = image_files(root)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        yield {"id": np.arange(start, start + len(chunk), dtype=np.int64),
               "label": np.array([label_of(p, root, classes) for p in chunk], np.int64),
               IMAGE: np.stack([decode(p.read_bytes(), channels) for p in chunk])}


def iter_parquet(path: Path, channels: int, batch_size: int = 256) -> Iterator[Batch]:
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
               IMAGE: np.stack([decode(x, channels) for x in raw])}
        start += n


def iter_source(path: Path, channels: int, batch_size: int = 256,
                classes: Sequence[str] | None = None) -> Iterator[Batch]:
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


def stream_stage(fn, batches: Iterator[Batch]) -> Batch:
    """A stage over a streamed source; only the (small) outputs are kept, not the images."""
    parts = [fn(b) for b in batches]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
