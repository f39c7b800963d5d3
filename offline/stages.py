"""Per-image stages of the offline job as batch functions: ``dict of arrays -> dict of arrays``.

One function per stage, called by both engines:
- the single-process path (``offline.pipeline`` / ``offline.stream``) calls them on slices of
  in-memory arrays or on batches of a streaming source (:mod:`offline.sources`);
- Ray Data (:mod:`offline.ray_data`) calls the very same functions inside ``map_batches``.

A batch is a dict with an ``image`` column of uint8 ``(N, H, W, C)`` images (plus any
pass-through columns such as ``id`` and ``label``); every stage returns its input columns
other than ``image`` together with its own outputs, so stages compose.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conceptguard.runtime import OnnxRuntime
from conceptguard.scoring import Monitor, score

Batch = dict[str, np.ndarray]
IMAGE = "image"


def as_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W)`` (grey, as image readers give) or ``(N, H, W, C)`` -> NHWC."""
    images = np.asarray(images)
    if images.dtype == object:  # a column of per-row arrays
        images = np.stack(list(images))
    if images.ndim == 3:
        images = images[..., None]
    return np.ascontiguousarray(images.astype(np.uint8, copy=False))


def to_nchw_float(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [0, 1]: ``classifier.inference.to_tensor`` without torch
    (the same correctly rounded float32 division, so the same bits), so the served-outputs
    stage needs only the serving set."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(255)


def _passthrough(batch: Batch) -> Batch:
    return {k: np.asarray(v) for k, v in batch.items() if k != IMAGE}


def served_outputs(rt: OnnxRuntime, batch: Batch) -> Batch:
    """The exported serving graph on a batch: logits, features, concepts (float32)."""
    o = rt.run(to_nchw_float(as_nhwc(batch[IMAGE])))
    return {**_passthrough(batch), "logits": o.logits, "features": o.features,
            "concepts": o.concepts}


def classifier_features(model: Any, batch: Batch) -> Batch:
    """Penultimate features (and logits) of the torch classifier on a batch."""
    from conceptguard.classifier.inference import predict

    logits, features = predict(model, as_nhwc(batch[IMAGE]), batch_size=len(batch[IMAGE]) or 1)
    return {**_passthrough(batch), "logits": logits, "features": features}


def scoring(monitor: Monitor, batch: Batch) -> Batch:
    """Trust and the three heads from served outputs (the service's scoring call)."""
    s = score(monitor, batch["logits"], batch["features"], batch["concepts"])
    return {**{k: np.asarray(v) for k, v in batch.items() if k != IMAGE},
            "prediction": s.predictions.astype(np.int64), "trust": s.trust,
            "p_misclassification": s.p_misclassification, "p_adversarial": s.p_adversarial,
            "p_unfamiliar": s.p_unfamiliar, "reject": s.reject.astype(bool)}


def run_batched(fn: Any, images: np.ndarray, batch_size: int = 256, **columns: np.ndarray
                ) -> Batch:
    """A stage over in-memory images in slices of ``batch_size``, outputs concatenated."""
    starts = range(0, len(images), batch_size) if len(images) else [0]  # empty: one call
    parts = [fn({IMAGE: images[i:i + batch_size],
                 **{k: v[i:i + batch_size] for k, v in columns.items()}}) for i in starts]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
