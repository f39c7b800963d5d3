"""Per-image stages of the offline job as batch functions: ``dict of arrays -> dict of arrays``.

One function per stage, called by both engines:
- the single-process path (``offline.pipeline`` / ``offline.labelled_sets``) calls them on
  slices of in-memory arrays or on batches streamed from image files
  (:func:`offline.streaming.iter_source`);
- Ray Data (:mod:`offline.ray_data`) calls the very same functions inside ``map_batches``.

A batch (:data:`Columns`) is a dict with an ``image`` column of uint8 ``(N, H, W, C)``
images (plus any pass-through columns such as ``id`` and ``label``); every stage returns its
input columns other than ``image`` together with its own outputs, so stages compose.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from conceptguard.imaging import to_model_input
from conceptguard.runtime import OnnxRuntime
from conceptguard.scoring import Monitor, Scores, score

Columns = dict[str, np.ndarray]  # one batch of a per-image stage: column name -> rows
StageFn = Callable[[Columns], Columns]  # a per-image stage with its model loaded
IMAGE = "image"
PER_IMAGE_STAGES = ("served", "classifier", "vlm", "attack", "scoring")  # build_stage_fn
ATTACK_SEED, ATTACK_ROWS = "attack_seed", "attack_rows"  # the attack stage's batch columns


def column_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W)`` (grey, as image readers give) or ``(N, H, W, C)`` -> NHWC."""
    images = np.asarray(images)
    if images.dtype == object:  # a column of per-row arrays
        images = np.stack(list(images))
    if images.ndim == 3:
        images = images[..., None]
    return np.ascontiguousarray(images.astype(np.uint8, copy=False))


def _passthrough(batch: Columns) -> Columns:
    return {k: np.asarray(v) for k, v in batch.items() if k != IMAGE}


def served_outputs(rt: OnnxRuntime, batch: Columns) -> Columns:
    """The exported serving graph on a batch: logits, features, concepts (float32)."""
    o = rt.run(to_model_input(column_nhwc(batch[IMAGE])))
    return {**_passthrough(batch), "logits": o.logits, "features": o.features,
            "concepts": o.concepts}


def classifier_features(model: Any, batch: Columns) -> Columns:
    """Penultimate features (and logits) of the torch classifier on a batch."""
    from conceptguard.classifier.inference import predict

    logits, features = predict(model, column_nhwc(batch[IMAGE]), batch_size=len(batch[IMAGE]) or 1)
    return {**_passthrough(batch), "logits": logits, "features": features}


def scoring(monitor: Monitor, batch: Columns) -> Columns:
    """Trust, the three heads and everything else :func:`score` returns, from served
    outputs (the service's scoring call); :func:`scores_from_columns` rebuilds ``Scores``."""
    s = score(monitor, batch["logits"], batch["features"], batch["concepts"])
    return {**{k: np.asarray(v) for k, v in batch.items() if k != IMAGE},
            "prediction": s.predictions.astype(np.int64), "trust": s.trust,
            "raw_trust": s.raw_trust,
            "p_misclassification": s.p_misclassification, "p_adversarial": s.p_adversarial,
            "p_unfamiliar": s.p_unfamiliar, "reject": s.reject.astype(bool),
            "p_anomaly": s.p_anomaly, "probabilities": s.probabilities,
            "paper_rule_reject": s.paper_rule_reject.astype(bool),
            "contributions": s.contributions, "reason": np.asarray(s.reason, dtype=str),
            **{RISK + k: v for k, v in s.risks.items()}}


RISK = "risk."  # scoring's per-detector risk columns


def scores_from_columns(b: Columns) -> Scores:
    """The ``Scores`` of :func:`scoring`'s columns (the inverse of that stage)."""
    return Scores(
        probabilities=b["probabilities"], predictions=b["prediction"],
        risks={k[len(RISK):]: v for k, v in b.items() if k.startswith(RISK)},
        p_misclassification=b["p_misclassification"], p_anomaly=b["p_anomaly"],
        p_adversarial=b["p_adversarial"], p_unfamiliar=b["p_unfamiliar"], trust=b["trust"],
        reject=b["reject"], reason=[str(r) for r in b["reason"]],
        paper_rule_reject=b["paper_rule_reject"], contributions=b["contributions"],
        raw_trust=b.get("raw_trust"))


def vlm_image_embeddings(vlm: Any, batch: Columns) -> Columns:
    """The VLM's image embeddings (float32, unit rows) of a batch."""
    return {**_passthrough(batch), "embedding": vlm.encode_images(column_nhwc(batch[IMAGE]))}


def attack_columns(n: int, seed: int, batch_size: int = 256) -> Columns:
    """The attack stage's seed columns for ``n`` rows attacked as one run seeded ``seed``:
    row j belongs to attack batch ``j // batch_size`` (``conceptguard.attacks.run_attack``'s
    batches), whose seed and size it carries."""
    from conceptguard.attacks import batch_seed

    group = np.arange(n) // batch_size
    sizes = np.minimum(batch_size, n - group * batch_size)
    return {ATTACK_SEED: np.array([batch_seed(seed, int(g)) for g in group], np.int64),
            ATTACK_ROWS: sizes.astype(np.int64)}


def attack_images(model: Any, attack: Any, batch: Columns) -> Columns:
    """Adversarial uint8 NHWC images (``adversarial``) of a batch against its ``label``s.

    Rows are attacked in the groups :func:`attack_columns` assigned (one seed each), so the
    result does not depend on how an engine batches them, as long as a group is not split:
    a split group raises (its random starts would differ from the single-process run)."""
    import torch

    from conceptguard.attacks import attack_batch
    from conceptguard.classifier.inference import to_tensor

    images = column_nhwc(batch[IMAGE])
    seeds, rows = np.asarray(batch[ATTACK_SEED]), np.asarray(batch[ATTACK_ROWS])
    labels = torch.as_tensor(np.asarray(batch["label"]), dtype=torch.long)
    out = np.empty_like(images)
    model.eval()
    for s in dict.fromkeys(seeds.tolist()):  # groups in order of appearance
        idx = np.flatnonzero(seeds == s)
        if len(idx) != rows[idx[0]]:
            raise ValueError(f"attack batch {s} split across engine batches ({len(idx)} of "
                             f"{rows[idx[0]]} rows)")
        adv = attack_batch(attack, to_tensor(images[idx]), labels[idx], int(s))
        out[idx] = (adv * 255.0).round().clamp(0, 255).to(torch.uint8) \
            .permute(0, 2, 3, 1).contiguous().numpy()
    return {**_passthrough(batch), "adversarial": out}


def build_stage_fn(stage: str, *, onnx: str | Path | None = None,
                   classifier: str | Path | None = None, bank: str | Path | None = None,
                   vlm: dict | None = None, attack: dict | None = None, monitor: Any = None,
                   threads: int = 0) -> StageFn:
    """The batch function of a per-image stage with its model loaded once, from what a
    worker can receive (paths and specs): ``served`` (``onnx``, or a ``bank``'s graph),
    ``classifier`` (``classifier``), ``vlm`` (a ``VLMSpec`` as a dict), ``attack`` (the
    ``classifier`` and an ``AttackSpec`` as a dict), ``scoring`` (a ``monitor``, or a
    ``bank``'s). ``threads``: intra-op threads of the runtime (0: its default)."""
    from functools import partial

    if stage == "served":
        from conceptguard.bank import ONNX
        from conceptguard.runtime import OnnxRuntime

        path = Path(onnx) if onnx is not None else Path(bank) / ONNX  # type: ignore[arg-type]
        return partial(served_outputs, OnnxRuntime(path, device="cpu", threads=threads))
    if stage in ("classifier", "attack"):
        from conceptguard.classifier.io import load_classifier

        model, _, _ = load_classifier(Path(classifier))  # type: ignore[arg-type]
        if stage == "classifier":
            return partial(classifier_features, model)
        from conceptguard.attacks import AttackSpec, build_attack

        return partial(attack_images, model,
                       build_attack(model, AttackSpec.model_validate(attack)))
    if stage == "vlm":
        from conceptguard.vlm import VLMSpec, create_vlm

        return partial(vlm_image_embeddings, create_vlm(VLMSpec.model_validate(vlm)))
    if stage == "scoring":
        if monitor is None:
            from conceptguard.bank import load_bank

            monitor = load_bank(Path(bank)).monitor  # type: ignore[arg-type]
        return partial(scoring, monitor)
    raise ValueError(f"unknown stage {stage!r}; one of {PER_IMAGE_STAGES}")


def run_batched(fn: Any, images: np.ndarray, batch_size: int = 256, **columns: np.ndarray
                ) -> Columns:
    """A stage over in-memory images in slices of ``batch_size``, outputs concatenated."""
    starts = range(0, len(images), batch_size) if len(images) else [0]  # empty: one call
    parts = [fn({IMAGE: images[i:i + batch_size],
                 **{k: v[i:i + batch_size] for k, v in columns.items()}}) for i in starts]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
