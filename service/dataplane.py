"""The protocol-agnostic data plane: image bytes, tensors or features in, scored results out.

Both the v1 routes and the Open Inference Protocol v2 routes call this module; it knows
nothing about HTTP. Image bytes are decoded and resized in the thread pool; images then go
through the batcher, and each batch is one runtime call: on the bank's fused graph
(``monitor.onnx``) that call returns every score too (:func:`conceptguard.scoring.
scores_from_graph`); otherwise it is followed by one call of the core's
:func:`conceptguard.scoring.score` (the function the offline evaluation uses). The sidecar
path (features in) always uses :func:`~conceptguard.scoring.score`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

from conceptguard.imaging import ImageError, preprocess_bytes, to_model_input
from conceptguard.runtime import RuntimeOutputs
from conceptguard.scoring import RejectReason, Scores, score, scores_from_graph, top_reasons
from service import metrics
from service.batching import Batcher
from service.runtime_state import Loaded, RuntimeState
from service.settings import Settings

log = logging.getLogger("conceptguard.service")

Work = tuple[Loaded, np.ndarray]  # an image for a bank: uint8 (H, W, C) or float32 (C, H, W)


class ServiceError(Exception):
    """A client-side problem other than an undecodable image; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers


@dataclass(frozen=True, eq=False)
class Scored:
    """One runtime batch and its scores."""

    loaded: Loaded
    scores: Scores


Row = tuple[Scored, int]


@dataclass(frozen=True)
class Results:
    """Scored inputs of one request, as arrays of length N (``contributions``: N x K)."""

    loaded: Loaded
    probabilities: np.ndarray
    predictions: np.ndarray
    trust: np.ndarray
    reject: np.ndarray
    p_misclassification: np.ndarray
    p_adversarial: np.ndarray
    p_unfamiliar: np.ndarray
    paper_rule_reject: np.ndarray
    contributions: np.ndarray
    reason: list[RejectReason]

    def __len__(self) -> int:
        return len(self.predictions)

    @classmethod
    def from_scores(cls, loaded: Loaded, s: Scores) -> Results:
        return cls(loaded, s.probabilities, s.predictions, s.trust, s.reject,
                   s.p_misclassification, s.p_adversarial, s.p_unfamiliar,
                   s.paper_rule_reject, s.contributions, list(s.reason))

    @classmethod
    def from_rows(cls, rows: Sequence[Row]) -> Results:
        first = rows[0][0]
        if all(scored is first for scored, _ in rows):
            idx = np.fromiter((i for _, i in rows), dtype=np.intp, count=len(rows))
            s = first.scores
            if len(idx) == len(s.trust) and np.array_equal(idx, np.arange(len(idx))):
                return cls.from_scores(first.loaded, s)
            return cls(first.loaded, s.probabilities[idx], s.predictions[idx],
                       s.trust[idx], s.reject[idx], s.p_misclassification[idx],
                       s.p_adversarial[idx], s.p_unfamiliar[idx], s.paper_rule_reject[idx],
                       s.contributions[idx], [s.reason[i] for i in idx.tolist()])

        def pick(get: str) -> np.ndarray:
            return np.stack([_field(scored.scores, get)[i] for scored, i in rows])

        return cls(first.loaded, pick("probabilities"), pick("predictions"), pick("trust"),
                   pick("reject"), pick("p_misclassification"), pick("p_adversarial"),
                   pick("p_unfamiliar"), pick("paper_rule_reject"), pick("contributions"),
                   [scored.scores.reason[i] for scored, i in rows])

    def labels(self) -> list[str]:
        classes = self.loaded.classes
        return [classes[p] for p in self.predictions.tolist()]

    def top_probabilities(self, i: int, k: int) -> list[tuple[str, float]]:
        row = self.probabilities[i]
        k = min(k, len(row))
        top = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
        top = top[np.argsort(-row[top], kind="stable")]
        classes = self.loaded.classes
        return [(classes[j], float(row[j])) for j in top.tolist()]

    def top_concepts(self, i: int, k: int) -> list[tuple[str, float]]:
        if k <= 0:
            return []
        return top_reasons(self.contributions[i], self.loaded.concept_names, k)


def _field(s: Scores, name: str) -> np.ndarray:
    if name == "probabilities":
        return s.probabilities
    return getattr(s, name)


class DataPlane:
    """Owns the batcher; turns inputs into :class:`Results` for the bank being served.

    Inference (the batch function) runs on its own single thread, apart from the thread
    pool that decodes images and serves the sync routes; at most
    ``CONCEPTGUARD_DECODE_CONCURRENCY`` images are decoded at once (memory bound), and
    images are admitted to the queue before they are decoded (a request that would be shed
    is refused before any decoding).
    """

    def __init__(self, state: RuntimeState, settings: Settings):
        self.state = state
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="conceptguard-inference")
        self.batcher: Batcher[Work, Row] = Batcher(
            self.run_batch, max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_s, queue_size=settings.queue_size,
            observer=metrics.QueueObserver(), run_sync=self._run_inference,
            adaptive=settings.adaptive_batching)
        self.decode_limiter = anyio.CapacityLimiter(settings.decode_concurrency)

    async def _run_inference(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def start(self) -> None:
        await self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def saturated(self) -> bool:
        """True when the queue cannot take one more image now (admission, before reading)."""
        return self.batcher.pending >= self.batcher.queue_size

    # ------------------------------------------------------------ entry points

    def check_count(self, n: int, what: str = "images") -> None:
        if n == 0:
            raise ServiceError(f"no {what} in the request", 400, "empty")
        limit = self.settings.max_images_per_request
        if n > limit:
            raise ServiceError(f"{n} {what} in one request; the limit is {limit} "
                               f"(CONCEPTGUARD_MAX_IMAGES_PER_REQUEST)", 413, "too_many_images")

    async def classify_images(self, blobs: Sequence[bytes]) -> Results:
        """Encoded image files -> results, in order. The images take their queue places
        before they are decoded: a request the queue cannot take is refused undecoded."""
        self.check_count(len(blobs))
        loaded = self.state.require()
        with self.batcher.reserve(len(blobs)) as ticket:
            arrays = await anyio.to_thread.run_sync(self._decode_all, blobs, loaded,
                                                    limiter=self.decode_limiter)
            rows = await self.batcher.submit([(loaded, a) for a in arrays], ticket=ticket)
        return Results.from_rows(rows)

    async def classify_tensor(self, images: np.ndarray) -> Results:
        """float32 ``(N, C, H, W)`` images in [0, 1] -> results."""
        loaded = self.state.require()
        self.check_count(len(images))
        check_image_tensor(images, loaded)
        rows = await self.batcher.submit([(loaded, x) for x in images])
        return Results.from_rows(rows)

    async def monitor(self, features: np.ndarray, logits: np.ndarray | None) -> Results:
        """Sidecar mode: the classifier ran elsewhere; score its features (and logits)."""
        loaded = self.state.require()
        check_feature_tensors(features, logits, loaded)
        self.check_count(len(features), "rows")
        results = await anyio.to_thread.run_sync(self._score_features, loaded, features, logits)
        return results

    # ------------------------------------------------------------ worker-thread parts

    def _decode_all(self, blobs: Sequence[bytes], loaded: Loaded) -> list[np.ndarray]:
        channels, size, _ = loaded.input_shape
        out = []
        for i, data in enumerate(blobs):
            try:
                out.append(preprocess_bytes(data, input_size=size, channels=channels,
                                            max_bytes=self.settings.max_upload_bytes,
                                            max_pixels=self.settings.max_image_pixels))
            except ImageError as exc:
                if len(blobs) == 1:
                    raise
                raise ImageError(f"image {i}: {exc}", exc.status, exc.code) from exc
            except Exception as exc:  # a decoder bug on hostile bytes is still bad input
                log.warning("image decoder failed: %r", exc)
                prefix = f"image {i}: " if len(blobs) > 1 else ""
                raise ImageError(f"{prefix}could not decode the image: {exc}", 400,
                                 "corrupt") from exc
        return out

    def run_batch(self, items: list[Work]) -> list[Row]:
        """The batch function: one runtime call and one scoring call per bank in the batch."""
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, (loaded, array) in enumerate(items):
            groups.setdefault((id(loaded), array.dtype == np.uint8), []).append(i)
        out: list[Row | None] = [None] * len(items)
        for (_, is_uint8), idxs in groups.items():
            loaded = items[idxs[0]][0]
            stacked = np.stack([items[i][1] for i in idxs])
            x = to_model_input(stacked) if is_uint8 else stacked
            t0 = time.perf_counter()
            o = loaded.runtime.run(x)
            s = scores_of(loaded, o)
            metrics.INFERENCE_DURATION.observe(time.perf_counter() - t0)
            loaded.metrics.record(s, o.concepts)
            scored = Scored(loaded, s)
            for j, i in enumerate(idxs):
                out[i] = (scored, j)
        return out  # type: ignore[return-value]

    def _score_features(self, loaded: Loaded, features: np.ndarray,
                        logits: np.ndarray | None, record: bool = True) -> Results:
        with np.errstate(all="ignore"):  # overflow is checked below, not warned about
            if logits is None:
                logits = loaded.head_logits(features)
            concepts = loaded.concepts_from_features(features)
            check_finite("logits computed from the features", logits)
            check_finite("concept scores computed from the features", concepts)
            s = score(loaded.bank.monitor, logits, features, concepts)
        for name in ("trust", "p_misclassification", "p_adversarial", "contributions"):
            check_finite(f"{name} computed from these inputs", getattr(s, name))
        check_finite("probabilities computed from these inputs", s.probabilities)
        if record:
            loaded.metrics.record(s, concepts)
        return Results.from_scores(loaded, s)

    # ------------------------------------------------------------ warm-up

    def warm_up(self, loaded: Loaded) -> None:
        """Every route's first call, done before the worker reports ready (blocking; no
        metrics recorded): image decode and resize, the runtime and scoring on a batch, the
        sidecar path with and without logits (it loads the classifier head)."""
        from conceptguard.imaging import encode_probe_png

        channels, size, _ = loaded.input_shape
        decoded = self._decode_all([encode_probe_png(size, channels)], loaded)
        x = to_model_input(np.stack(decoded))
        o = loaded.runtime.run(x)
        scores_of(loaded, o)
        features = np.asarray(o.features, dtype=np.float32)
        self._score_features(loaded, features, None, record=False)
        self._score_features(loaded, features, np.asarray(o.logits, np.float32), record=False)


def scores_of(loaded: Loaded, o: RuntimeOutputs) -> Scores:
    """The scores of one runtime call: from the fused graph's outputs when it ran, else
    numpy :func:`~conceptguard.scoring.score` on the classifier's outputs."""
    monitor = loaded.bank.monitor
    if o.monitor is not None:
        return scores_from_graph(o.monitor, monitor.threshold)
    return score(monitor, o.logits, o.features, o.concepts)


# ---------------------------------------------------------------- validation helpers


def check_image_tensor(images: np.ndarray, loaded: Loaded) -> None:
    c, h, w = loaded.input_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, h, w):
        raise ServiceError(f"image tensor must have shape [N, {c}, {h}, {w}] (FP32 in [0, 1]), "
                           f"got {list(images.shape)}", 422, "invalid_tensor")
    if images.dtype != np.float32:
        raise ServiceError(f"image tensor must be float32, got {images.dtype}", 422,
                           "invalid_tensor")
    if not np.isfinite(images).all():
        raise ServiceError("image tensor contains NaN or infinite values", 422,
                           "invalid_tensor")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ServiceError(f"image values must lie in [0, 1], got [{images.min():.4g}, "
                           f"{images.max():.4g}]", 422, "invalid_tensor")


def check_finite(what: str, values: np.ndarray) -> None:
    """422 when an intermediate value overflowed (e.g. features near the float32 limit)."""
    if not np.isfinite(np.asarray(values)).all():
        raise ServiceError(f"non-finite {what} (the inputs are too large in magnitude)", 422,
                           "invalid_tensor")


def check_feature_tensors(features: np.ndarray, logits: np.ndarray | None,
                          loaded: Loaded) -> None:
    d, k = loaded.feature_dim, loaded.num_classes
    if features.ndim != 2 or features.shape[1] != d:
        raise ServiceError(f"features must have shape [N, {d}], got {list(features.shape)}",
                           422, "invalid_tensor")
    if not np.isfinite(features).all():
        raise ServiceError("features contain NaN or infinite values", 422, "invalid_tensor")
    if logits is None:
        return
    if logits.ndim != 2 or logits.shape != (features.shape[0], k):
        raise ServiceError(f"logits must have shape [{features.shape[0]}, {k}] (one row per "
                           f"features row), got {list(logits.shape)}", 422, "invalid_tensor")
    if not np.isfinite(logits).all():
        raise ServiceError("logits contain NaN or infinite values", 422, "invalid_tensor")


def as_float_array(data: object, name: str) -> np.ndarray:
    """JSON numbers (nested lists) -> float32 array; 422 on ragged or non-numeric data."""
    try:
        arr = np.asarray(data)
    except ValueError as exc:
        raise ServiceError(f"{name} is not a regular (rectangular) array: {exc}", 422,
                           "invalid_tensor") from exc
    if arr.dtype.kind not in "fiu":
        raise ServiceError(f"{name} must hold numbers only, got {arr.dtype.name} data", 422,
                           "invalid_tensor")
    return arr.astype(np.float32, copy=False)
