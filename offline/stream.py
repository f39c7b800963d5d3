"""Labelled input sets for fitting and evaluating the trust model: corrupted, attacked and
foreign images, run through the exported serving graph (so the monitor is fitted and
evaluated on exactly what the service computes). Attacks are cached; corruptions and
foreign sets are cheap and seeded, so they are recomputed."""

from __future__ import annotations

from functools import partial
from typing import Protocol

import numpy as np
import torch

from conceptguard.attacks import AttackSpec, run_attack
from conceptguard.calibration import Batch
from conceptguard.classifier.inference import to_tensor
from conceptguard.data import ArrayDataset
from conceptguard.foreign import foreign_images
from conceptguard.runtime import OnnxRuntime
from conceptguard.shifts import corrupt
from offline.cache import ArrayCache
from offline.stages import run_batched, served_outputs

FOREIGN_SOURCE_OFFSET = 10_000_000  # source ids of foreign inputs (folds), past any split


class _Ctx(Protocol):
    cache: ArrayCache
    progress: bool


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


def corrupted(rt: OnnxRuntime, ds: ArrayDataset, kind: str, severities: list[int], n: int,
              seed: int) -> Batch:
    """``n`` images of ``ds`` under corruption ``kind``; image i gets severity
    ``severities[i % len]``. Labels are the true labels (the prediction may stay right)."""
    idx = _pick(len(ds), n, seed)
    images = np.empty_like(ds.images[idx])
    for j, sev in enumerate(severities):
        rows = np.arange(len(idx)) % len(severities) == j
        images[rows] = corrupt(ds.images[idx[rows]], kind, sev, seed * 31 + sev)
    return served(rt, images, ds.labels[idx]).tagged("corruption", kind, idx)


def foreign(rt: OnnxRuntime, name: str, n: int, shape: tuple[int, int, int], seed: int
            ) -> Batch:
    """``n`` images of foreign set ``name``; label -1 (no prediction is right)."""
    h, _, c = shape
    images = foreign_images(name, n, h, c, seed)
    source = FOREIGN_SOURCE_OFFSET + seed * 100_000 + np.arange(n)
    return served(rt, images, np.full(n, -1)).tagged("foreign", name, source)


def attacked(ctx: _Ctx, rt: OnnxRuntime, model, key: dict, ds: ArrayDataset, clean: Batch,
             spec: AttackSpec, n: int, seed: int) -> tuple[Batch, int]:
    """Attack up to ``n`` correctly classified inputs of ``ds`` (cached) and return the served
    outputs of all of them (labels = the original labels; a failed attack stays right) and
    how many were attacked. ``key`` names the classifier and the data for the cache."""
    correct = np.flatnonzero(clean.predictions == clean.labels)
    chosen = _pick(len(ds), n, seed, correct)

    def compute() -> dict[str, np.ndarray]:
        adv = run_attack(model, to_tensor(ds.images[chosen]), ds.labels[chosen], spec,
                         seed=seed, progress=ctx.progress)
        adv_u8 = (adv * 255.0).round().clamp(0, 255).to(torch.uint8)
        return {"images": adv_u8.permute(0, 2, 3, 1).contiguous().numpy()}

    images = ctx.cache.get_or_compute(
        "adversarial-images", {**key, "attack": spec.model_dump(), "index": chosen.tolist(),
                               "seed": seed}, compute)["images"]
    if len(images) == 0:
        return clean.select(np.zeros(len(clean), bool)).tagged("attack", spec.family), 0
    return served(rt, images, ds.labels[chosen]).tagged("attack", spec.family, chosen), \
        len(images)


def fitting_stream(ctx: _Ctx, cfg, rt: OnnxRuntime, model, key: dict, ds: ArrayDataset,
                   clean: Batch, seed: int) -> Batch:
    """The calibration split's labelled stream: every clean input, each corruption kind,
    each fitting attack (failed attempts included) and each fitting foreign set."""
    shape = ds.images.shape[1:]
    parts = [clean.tagged("clean", "clean", np.arange(len(clean)))]
    for i, kind in enumerate(cfg.shifts.kinds):
        parts.append(corrupted(rt, ds, kind, cfg.shifts.severities, cfg.shifts.fit_per_kind,
                               seed + 100 + i))
    for i, spec in enumerate(cfg.adversarial.fit_attacks):
        n = min(cfg.adversarial.fit_per_attack, cfg.adversarial.limits.get(spec.kind, 1 << 30))
        batch, _ = attacked(ctx, rt, model, {**key, "split": "calibration"}, ds, clean, spec,
                            n, seed + 200 + i)
        parts.append(batch)
    for i, name in enumerate(cfg.foreign.fit_sets):
        parts.append(foreign(rt, name, cfg.foreign.fit_per_set, shape, seed + 300 + i))
    return Batch.concat(parts)


def evaluation_sets(ctx: _Ctx, cfg, rt: OnnxRuntime, model, key: dict, ds: ArrayDataset,
                    clean: Batch, seed: int) -> tuple[dict[str, dict[str, Batch]],
                                                      dict[str, int]]:
    """The test split's corrupted, attacked (successful only) and foreign sets, by group and
    name; and how many inputs each attack tried."""
    shape = ds.images.shape[1:]
    sets: dict[str, dict[str, Batch]] = {"corruption": {}, "attack": {}, "foreign": {}}
    attempted: dict[str, int] = {}
    for i, kind in enumerate(cfg.shifts.kinds):
        sets["corruption"][kind] = corrupted(rt, ds, kind, cfg.shifts.severities,
                                             cfg.shifts.test_per_kind, seed + 1100 + i)
    for i, spec in enumerate(cfg.adversarial.attacks):
        n = min(cfg.adversarial.per_split, cfg.adversarial.limits.get(spec.kind, 1 << 30))
        batch, tried = attacked(ctx, rt, model, {**key, "split": "test"}, ds, clean, spec, n,
                                seed + 10 + i)
        sets["attack"][spec.name] = batch.select(batch.wrong)
        attempted[spec.name] = tried
    for i, name in enumerate(cfg.foreign.test_sets):
        sets["foreign"][name] = foreign(rt, name, cfg.foreign.test_per_set, shape,
                                        seed + 1300 + i)
    return sets, attempted
