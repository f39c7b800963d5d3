"""Where build-bank's per-image stages run: one method, ``map(stage, columns, **spec)``.

``columns`` is a batch of in-memory arrays (an ``image`` column plus pass-through columns,
or for scoring the served outputs);
``spec`` names the stage's model as :func:`offline.stages.build_stage_fn` takes it (paths and
specs, which a worker process can receive). Both engines cut the rows into the same
consecutive slices of ``batch_size`` and call the same stage function on each:

- :class:`LocalEngine`: in this process (``run_batched``), each stage function built once;
- :class:`RayEngine`: Ray Data, one block per slice, ``map_batches`` tasks (one CPU each)
  that run :class:`offline.ray_data.StageActor`, built once per worker process and model;
  the results put back in row order. Images that live in files (an image-folder source's
  undecoded rows) travel as paths: the workers read and decode them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from offline.stages import IMAGE, Columns, StageFn, build_stage_fn, run_batched

ROW = "_row"  # the Ray engine's row-order column
FILE = "_file"  # the Ray engine's column of image paths, decoded by the workers
REPO = Path(__file__).resolve().parents[1]


class Engine(Protocol):
    name: str

    def map(self, stage: str, columns: Columns, *, batch_size: int = 256, **spec: Any
            ) -> Columns: ...

    def close(self) -> None: ...


def rows(columns: Columns) -> int:
    """The number of rows of a batch (the image column's, or any column's)."""
    return len(columns[IMAGE] if IMAGE in columns else next(iter(columns.values())))


def spec_key(stage: str, spec: dict[str, Any]) -> str:
    """The identity of a built stage function (objects, such as a monitor, by identity:
    the build holds them while the engine lives)."""
    return stage + json.dumps(spec, sort_keys=True, default=lambda o: f"@{id(o)}")


class LocalEngine:
    """The single-process engine: the stage function on slices of the arrays."""

    name = "local"

    def __init__(self) -> None:
        self._fns: dict[str, StageFn] = {}

    def fn(self, stage: str, **spec: Any) -> StageFn:
        key = spec_key(stage, spec)
        if key not in self._fns:
            self._fns[key] = build_stage_fn(stage, **spec)
        return self._fns[key]

    def map(self, stage: str, columns: Columns, *, batch_size: int = 256, **spec: Any
            ) -> Columns:
        fn, n = self.fn(stage, **spec), rows(columns)
        if IMAGE in columns:
            rest = {k: v for k, v in columns.items() if k != IMAGE}
            return run_batched(fn, columns[IMAGE], batch_size, **rest)
        parts = [fn({k: v[i:i + batch_size] for k, v in columns.items()})
                 for i in (range(0, n, batch_size) if n else [0])]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        self._fns.clear()


class RayEngine:
    """Ray Data: ``from_blocks`` (one block per ``batch_size`` slice) -> ``map_batches``
    (at most ``workers`` tasks at once, :func:`offline.ray_data.stage_task`) -> rows in
    order.

    Joins the cluster at ``address`` (or ``RAY_ADDRESS``) if given, else starts a local Ray
    with ``workers`` CPUs (and shuts it down on :meth:`close`)."""

    name = "ray"

    def __init__(self, workers: int = 2, address: str | None = None) -> None:
        import ray
        import ray.data

        self.workers = max(1, workers)
        self._local = LocalEngine()  # empty inputs: nothing to distribute
        self._started = False
        address = address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
                "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}}
            if address:
                ray.init(address=address, runtime_env=env, log_to_driver=False)
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                         runtime_env=env)
            self._started = True
        # the build prints one line per stage; Ray Data's per-dataset lines would drown them
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)

    def map(self, stage: str, columns: Columns, *, batch_size: int = 256, **spec: Any
            ) -> Columns:
        import ray.data
        from ray.data.block import BlockAccessor

        from offline.ray_data import stage_task

        n = rows(columns)
        if n == 0:
            return self._local.map(stage, columns, batch_size=batch_size, **spec)
        columns, decoder = _files_for_workers(columns)
        blocks = [BlockAccessor.batch_to_block(
            {ROW: np.arange(i, min(i + batch_size, n), dtype=np.int64),
             **{k: np.ascontiguousarray(v[i:i + batch_size]) for k, v in columns.items()}})
            for i in range(0, n, batch_size)]
        ds = ray.data.from_blocks(blocks).map_batches(
            stage_task, fn_kwargs={"stage": stage, "spec": spec, "decoder": decoder},
            compute=ray.data.TaskPoolStrategy(size=self.workers),
            batch_size=None, num_cpus=1, batch_format="numpy")  # a batch = one block
        # (stage functions pass every column but the image through, the row column too)
        parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        out = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
        order = np.argsort(out.pop(ROW), kind="stable")
        return {k: v[order] for k, v in out.items()}

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _files_for_workers(columns: Columns) -> tuple[Columns, Any]:
    """An image column of undecoded rows (:class:`~conceptguard.data.lazy.LazyImages`) that
    live in files becomes a column of their paths and a decoder, so that the Ray workers
    read and decode the files themselves (the driver holds paths, never the pixels); other
    lazy rows are decoded here. Arrays pass unchanged (decoder None)."""
    from conceptguard.data.lazy import LazyImages

    images = columns.get(IMAGE)
    if not isinstance(images, LazyImages):
        return columns, None
    rest = {k: v for k, v in columns.items() if k != IMAGE}
    located = images.files()
    if located is None:
        return {**rest, IMAGE: images.load()}, None
    paths, decoder = located
    return {**rest, FILE: paths}, decoder


def make_engine(name: str, workers: int = 2, address: str | None = None) -> Engine:
    if name == "local":
        return LocalEngine()
    if name == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise ValueError("--engine ray: Ray is not installed "
                             "(pip install 'conceptguard[ray]')") from exc
        return RayEngine(workers, address)
    raise ValueError(f"unknown engine {name!r}; one of local, ray")
