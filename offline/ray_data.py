"""The offline job's per-image stages on Ray Data: ``map_batches`` over a streaming dataset
read from files, calling the same stage functions as the single-process path
(:mod:`offline.stages`) with the same decoding (:func:`offline.streaming.decode_columns`).

    ds = read_source("images/", channels=1)                 # or "train.parquet"
    ds = ds.map_batches(StageActor, fn_constructor_kwargs={"stage": "served", "bank": bank},
                        compute=ray.data.ActorPoolStrategy(size=2), batch_size=256)
    out = collect(ds)                                       # columns, sorted by id

Each actor loads its model once (ONNX session, torch classifier or the bank's monitor) and
then runs the stage function on every batch it is given. Ray Data streams: blocks are read,
decoded and scored as they flow, so memory is bounded by the blocks in flight.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from offline import stages, streaming
from offline.engine import spec_key


def read_source(path: Path | str, channels: int, classes: Sequence[str] | None = None,
                override_num_blocks: int | None = None) -> Any:
    """A Ray dataset of ``{id, label, image}`` rows (images decoded to uint8 NHWC in
    ``map_batches``) from an image folder or a Parquet file with an ``id`` column."""
    import ray.data

    path = Path(path)
    kw = {"override_num_blocks": override_num_blocks} if override_num_blocks else {}
    if path.is_file() and path.suffix == ".parquet":
        ds = ray.data.read_parquet(str(path), columns=["id", "image", "label"], **kw)
    else:
        files = streaming.image_files(path)
        index = {str(p.resolve()): (i, streaming.folder_label(p, path, classes))
                 for i, p in enumerate(files)}
        ds = ray.data.read_binary_files([str(p) for p in files], include_paths=True, **kw)
        ds = ds.map_batches(partial(_index_rows, index), batch_format="numpy")
    return ds.map_batches(partial(streaming.decode_columns, channels=channels),
                          batch_format="numpy")


def _index_rows(index: dict[str, tuple[int, int]], batch: dict[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
    keys = [str(Path(p).resolve()) for p in batch["path"]]
    return {"id": np.array([index[k][0] for k in keys], np.int64),
            "label": np.array([index[k][1] for k in keys], np.int64),
            "image": batch["bytes"]}


class StageActor:
    """A ``map_batches`` callable: loads a stage's model once, then runs the stage function
    of :mod:`offline.stages` on every batch (exactly what the single process calls).
    Keyword arguments: those of :func:`offline.stages.build_stage_fn`."""

    def __init__(self, stage: str, **kwargs: Any):
        import torch

        from conceptguard.threads import single_threaded_blas

        single_threaded_blas()
        torch.set_num_threads(1)  # one CPU per actor
        self.fn = stages.build_stage_fn(stage, threads=1, **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.fn(batch)


_BUILT: OrderedDict[str, StageActor] = OrderedDict()  # per worker process, most recent last
_KEEP = 8


def stage_task(batch: dict[str, np.ndarray], stage: str, spec: dict[str, Any],
               decoder: Any = None) -> dict[str, np.ndarray]:
    """A ``map_batches`` task function: the stage's :class:`StageActor`, built once per
    worker process and spec (Ray reuses worker processes across tasks and datasets, so a
    build of many short stage runs loads each model once per worker, not once per run).
    With ``decoder``, the batch carries image paths (``_file``, see
    :mod:`offline.engine`) that this task reads and decodes first."""
    if decoder is not None:
        batch = dict(batch)
        batch[stages.IMAGE] = decoder([bytes(p) for p in batch.pop("_file")])
    key = spec_key(stage, spec)
    if key not in _BUILT:
        _BUILT[key] = StageActor(stage, **spec)
        while len(_BUILT) > _KEEP:
            _BUILT.popitem(last=False)
    _BUILT.move_to_end(key)
    return _BUILT[key](batch)


def run_stage(ds: Any, stage: str, *, workers: int = 1, batch_size: int = 256,
              num_cpus: float = 1.0, **kwargs: Any) -> Any:
    """``ds.map_batches`` of one stage on ``workers`` actors (``num_cpus`` each; the actors
    of every chained stage and a read task must fit the cluster at once, or the pipeline
    waits for CPUs forever)."""
    import ray.data

    return ds.map_batches(StageActor, fn_constructor_kwargs={"stage": stage, **kwargs},
                          compute=ray.data.ActorPoolStrategy(size=workers),
                          batch_size=batch_size, num_cpus=num_cpus, batch_format="numpy")


def collect(ds: Any, drop: Sequence[str] = ("image",)) -> dict[str, np.ndarray]:
    """Every column (but ``drop``) as arrays, rows sorted by ``id``."""
    parts = [{k: v for k, v in b.items() if k not in drop}
             for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    out = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    order = np.argsort(out["id"], kind="stable")
    return {k: v[order] for k, v in out.items()}
