"""Labelled input sets for fitting and evaluating the trust model: corrupted, attacked and
foreign images, run through the exported serving graph (so the monitor is fitted and
evaluated on exactly what the service computes). The per-image work goes through ``m``
(:class:`ServeAndAttack`: the build's served-outputs and attack stages on its engine);
attacks are cached; corruptions and foreign sets are cheap and seeded, so they are
recomputed."""

from __future__ import annotations

from functools import partial
from typing import Protocol

import numpy as np

from conceptguard.attacks import AttackSpec
from conceptguard.calibration import Batch
from conceptguard.data import ArrayDataset
from conceptguard.foreign import foreign_images
from conceptguard.runtime import OnnxRuntime
from conceptguard.shifts import corrupt
from offline.stages import run_batched, served_outputs

FOREIGN_SOURCE_OFFSET = 10_000_000  # source ids of foreign inputs (folds), past any split


class ServeAndAttack(Protocol):
    """The per-image stages this module needs (``offline.pipeline.BuildModels``)."""

    def served(self, images: np.ndarray, labels: np.ndarray) -> Batch:
        """Outputs of the serving graph for uint8 images, labelled ``labels``."""
        ...

    def attack(self, key: dict, images: np.ndarray, labels: np.ndarray, spec: AttackSpec,
               seed: int) -> np.ndarray:
        """Adversarial uint8 versions of ``images`` (cached under ``key``)."""
        ...


def served(rt: OnnxRuntime, images: np.ndarray, labels: np.ndarray, batch_size: int = 256
           ) -> Batch:
    """Outputs of the exported serving graph for uint8 images: the served-outputs stage
    (:func:`offline.stages.served_outputs`, which Ray Data runs too) over slices."""
    if len(images) == 0:
        raise ValueError("served: no images")
    out = run_batched(partial(served_outputs, rt), images, batch_size)
    return Batch(out["logits"], out["features"], out["concepts"], labels.astype(np.int64))


def _pick(n_total: int, n: int, seed: int, pool: np.ndarray | None = None) -> np.ndarray:
    pool = np.arange(n_total) if pool is None else pool
    return np.sort(np.random.default_rng(seed).choice(pool, size=min(n, len(pool)),
                                                      replace=False))


def corrupted(m: ServeAndAttack, ds: ArrayDataset, kind: str, severities: list[int], n: int,
              seed: int) -> Batch:
    """``n`` images of ``ds`` under corruption ``kind``; image i gets severity
    ``severities[i % len]``. Labels are the true labels (the prediction may stay right)."""
    idx = _pick(len(ds), n, seed)
    images = np.empty_like(ds.images[idx])
    for j, sev in enumerate(severities):
        rows = np.arange(len(idx)) % len(severities) == j
        images[rows] = corrupt(ds.images[idx[rows]], kind, sev, seed * 31 + sev)
    return m.served(images, ds.labels[idx]).tagged("corruption", kind, idx)


def foreign(m: ServeAndAttack, name: str, n: int, shape: tuple[int, int, int], seed: int
            ) -> Batch:
    """``n`` images of foreign set ``name``; label -1 (no prediction is right)."""
    h, _, c = shape
    images = foreign_images(name, n, h, c, seed)
    source = FOREIGN_SOURCE_OFFSET + seed * 100_000 + np.arange(n)
    return m.served(images, np.full(n, -1)).tagged("foreign", name, source)


def attacked(m: ServeAndAttack, key: dict, ds: ArrayDataset, clean: Batch,
             spec: AttackSpec, n: int, seed: int) -> tuple[Batch, int]:
    """Attack up to ``n`` correctly classified inputs of ``ds`` (cached) and return the served
    outputs of all of them (labels = the original labels; a failed attack stays right) and
    how many were attacked. ``key`` names the classifier and the data for the cache."""
    correct = np.flatnonzero(clean.predictions == clean.labels)
    chosen = _pick(len(ds), n, seed, correct)
    if len(chosen) == 0:
        return clean.select(np.zeros(len(clean), bool)).tagged("attack", spec.family), 0
    images = m.attack({**key, "attack": spec.cache_fields(), "index": chosen.tolist()},
                      ds.images[chosen], ds.labels[chosen], spec, seed)
    return m.served(images, ds.labels[chosen]).tagged("attack", spec.family, chosen), \
        len(images)


def fitting_stream(m: ServeAndAttack, cfg, key: dict, ds: ArrayDataset,
                   clean: Batch, seed: int) -> Batch:
    """The calibration split's labelled stream: every clean input, each corruption kind,
    each fitting attack (failed attempts included) and each fitting foreign set."""
    shape = ds.images.shape[1:]
    parts = [clean.tagged("clean", "clean", np.arange(len(clean)))]
    for i, kind in enumerate(cfg.shifts.kinds):
        parts.append(corrupted(m, ds, kind, cfg.shifts.severities, cfg.shifts.fit_per_kind,
                               seed + 100 + i))
    for i, spec in enumerate(cfg.adversarial.fit_attacks):
        n = min(cfg.adversarial.fit_per_attack, cfg.adversarial.limits.get(spec.kind, 1 << 30))
        batch, _ = attacked(m, {**key, "split": "calibration"}, ds, clean, spec, n,
                            seed + 200 + i)
        parts.append(batch)
    for i, name in enumerate(cfg.foreign.fit_sets):
        parts.append(foreign(m, name, cfg.foreign.fit_per_set, shape, seed + 300 + i))
    return Batch.concat(parts)


def evaluation_sets(m: ServeAndAttack, cfg, key: dict, ds: ArrayDataset,
                    clean: Batch, seed: int) -> tuple[dict[str, dict[str, Batch]],
                                                      dict[str, int]]:
    """The test split's corrupted, attacked (successful only) and foreign sets, by group and
    name; and how many inputs each attack tried."""
    shape = ds.images.shape[1:]
    sets: dict[str, dict[str, Batch]] = {"corruption": {}, "attack": {}, "foreign": {}}
    attempted: dict[str, int] = {}
    for i, kind in enumerate(cfg.shifts.kinds):
        sets["corruption"][kind] = corrupted(m, ds, kind, cfg.shifts.severities,
                                             cfg.shifts.test_per_kind, seed + 1100 + i)
    for i, spec in enumerate(cfg.adversarial.attacks):
        n = min(cfg.adversarial.per_split, cfg.adversarial.limits.get(spec.kind, 1 << 30))
        batch, tried = attacked(m, {**key, "split": "test"}, ds, clean, spec, n,
                                seed + 10 + i)
        sets["attack"][spec.name] = batch.select(batch.wrong)
        attempted[spec.name] = tried
    for i, name in enumerate(cfg.foreign.test_sets):
        sets["foreign"][name] = foreign(m, name, cfg.foreign.test_per_set, shape,
                                        seed + 1300 + i)
    return sets, attempted
