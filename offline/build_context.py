"""What build-bank's stages and the commands built on them share: a :class:`Context` (the
config, the cache, the engine of the per-image stages, the VLM built on first use, the
timings) and the two cached per-image calls the other commands reuse on the build's cache
keys (:func:`torch_features`, :func:`vlm_embeddings`).

``offline.pipeline`` runs the build's stages on it; ``inject-faults``, ``diagnose`` and
``check-concepts`` use it for their own features and embeddings (so a command run after a
build reads the build's cached arrays), without importing the build itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conceptguard.vlm import VLMBackend, create_vlm
from offline.cache import ArrayCache
from offline.config import JobConfig
from offline.engine import Engine, LocalEngine
from offline.progress import stage
from offline.stages import IMAGE


class LazyVLM:
    """Builds the VLM only when a cache miss needs it (loading takes seconds)."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self._vlm: VLMBackend | None = None

    def get(self) -> VLMBackend:
        if self._vlm is None:
            self._vlm = create_vlm(self.cfg.vlm)
        return self._vlm

    @property
    def id(self) -> str:
        return self.cfg.vlm.model_dump_json()


@dataclass
class Context:
    """What every stage may use: the config, the cache, the engine of the per-image stages,
    the staging folder being written, and the timings the runner records."""

    cfg: JobConfig
    cache: ArrayCache
    progress: bool
    timings: dict[str, float] = field(default_factory=dict)
    engine: Engine = field(default_factory=LocalEngine)
    staging: Path = Path(".")
    vlm: LazyVLM = field(init=False)
    attacks_skipped: str | None = None  # why, when the classifier has no gradients

    def __post_init__(self) -> None:
        self.vlm = LazyVLM(self.cfg)

    def stage(self, name: str):
        return stage(name, self.timings, quiet=not self.progress)

    def cached(self, name: str, inputs: dict[str, Any] | None,
               compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """``compute()``, or its cached arrays under ``name`` + ``inputs`` (None: uncached)."""
        return compute() if inputs is None else self.cache.get_or_compute(name, inputs, compute)

    def map(self, stage_name: str, columns: dict[str, np.ndarray], *,
            cache: tuple[str, dict[str, Any]] | None = None, keep: tuple[str, ...] = (),
            **spec: Any) -> dict[str, np.ndarray]:
        """A per-image stage of :mod:`offline.stages` over ``columns`` on the engine
        (``spec``: the stage's model, as ``build_stage_fn`` takes it, and ``batch_size``).
        ``keep``: return only these outputs, each ``"name"`` or ``"name:stored"`` (returned
        and cached as ``stored``); ``cache`` ``(name, inputs)``: cache them under that key."""
        def run() -> dict[str, np.ndarray]:
            out = self.engine.map(stage_name, columns, **spec)
            if not keep:
                return out
            pairs = [k.split(":") if ":" in k else (k, k) for k in keep]
            return {stored: out[name] for name, stored in pairs}
        return self.cached(*cache, run) if cache else run()


def torch_features(ctx: Context, classifier: Path, chash: str, images: np.ndarray, split: str,
                   data_key: str) -> np.ndarray:
    """Penultimate features of the torch classifier (file ``classifier``, hash ``chash``)
    on ``images``, cached under the hash, ``data_key`` (the data spec and split digest) and
    ``split`` (build-bank's fit and reference splits: the aligner and the standardisation
    are fitted on them before the graph is exported)."""
    return ctx.map("classifier", {IMAGE: images}, keep=("features",),
                   cache=("classifier", {"hash": chash, "data": data_key, "split": split}),
                   classifier=str(classifier))["features"]


def vlm_embeddings(ctx: Context, vlm: LazyVLM, images: np.ndarray, key: str) -> np.ndarray:
    """The VLM's image embeddings of ``images`` (float32, unit rows), cached under the VLM
    spec and ``key`` (what names the images: data key, split, rows)."""
    return ctx.map("vlm", {IMAGE: images}, keep=("embedding:v",),
                   cache=("vlm-images", {"vlm": vlm.id, "images": key}),
                   vlm=ctx.cfg.vlm.model_dump())["v"]
