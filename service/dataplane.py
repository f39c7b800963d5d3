"""The protocol-agnostic data plane: image bytes, tensors or features in, scores out.

Both the v1 routes and the Open Inference Protocol v2 routes (REST and gRPC) call this
module; it knows nothing about HTTP. The request path, one phase per step:

1. admit: the images take their queue places (:meth:`Batcher.reserve`) before any work, so
   a request the queue cannot take is refused undecoded;
2. decode (:mod:`service.decoding`): small images are decoded by the batch worker, large
   ones in the thread pool before they are queued;
3. batch run (:meth:`DataPlane.run_batch`, on the single inference thread): decode, one
   runtime call per batch (on the bank's fused graph ``monitor.onnx`` it returns every
   score too, :func:`conceptguard.scoring.scores_from_graph`; otherwise it is followed by
   :func:`conceptguard.scoring.score`, the function the offline evaluation uses), the
   batch's metrics recorded once;
4. the request gets its rows back as one :class:`conceptguard.scoring.Scores`, which the
   v1 and v2 encoders (:mod:`service.encode_v1`, :mod:`service.encode_v2`) turn into bodies.

The sidecar path (features in) always uses :func:`~conceptguard.scoring.score`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import numpy as np

from conceptguard.imaging import to_model_input
from conceptguard.runtime import RuntimeOutputs
from conceptguard.scoring import Scores, score, scores_from_graph
from service import metrics
from service.batching import Batcher
from service.decoding import Decoder, where
from service.errors import ServiceError
from service.runtime_state import Loaded, RuntimeState
from service.settings import Settings

__all__ = ["DataPlane", "Job", "ServiceError", "as_float_array", "check_finite",
           "scores_of"]


@dataclass(slots=True)
class Job:
    """One image of a request for the batcher: encoded bytes (decoded by the batch worker),
    uint8 ``(H, W, C)`` already decoded, or float32 ``(C, H, W)`` in [0, 1]."""

    loaded: Loaded
    image: bytes | np.ndarray
    prefix: str = ""  # names the image in an error message ("image 2: ")


class DataPlane:
    """Owns the batcher and the decoder; turns inputs into :class:`Scores` for a bank.

    Inference (the batch function) runs on its own single thread, apart from the thread
    pool that decodes large images and serves the sync routes.
    """

    def __init__(self, state: RuntimeState, settings: Settings):
        self.state = state
        self.settings = settings
        self.decoder = Decoder(settings)
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="conceptguard-inference")
        self.batcher: Batcher[Job, Scores] = Batcher(
            self.run_batch, max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_s, queue_size=settings.queue_size,
            observer=metrics.QueueObserver(), run_sync=self._run_inference,
            adaptive=settings.adaptive_batching)

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

    async def classify_images(self, loaded: Loaded, blobs: Sequence[bytes]) -> Scores:
        """Encoded image files -> their scores, in order. The images take their queue places
        before they are decoded: a request the queue cannot take is refused undecoded."""
        self.check_count(len(blobs))
        n = len(blobs)
        with self.batcher.reserve(n) as ticket:
            jobs = []
            for i, data in enumerate(blobs):
                image: bytes | np.ndarray = data
                if not self.decoder.inline(data):
                    image = await self.decoder.decode_in_pool(data, loaded.input_shape,
                                                              where(i, n))
                jobs.append(Job(loaded, image, where(i, n)))
            rows = await self.batcher.submit(jobs, ticket=ticket)
        return Scores.concat(rows)

    async def classify_tensor(self, loaded: Loaded, images: np.ndarray) -> Scores:
        """float32 ``(N, C, H, W)`` images in [0, 1] -> their scores."""
        self.check_count(len(images))
        check_image_tensor(images, loaded)
        rows = await self.batcher.submit([Job(loaded, x) for x in images])
        return Scores.concat(rows)

    async def monitor(self, loaded: Loaded, features: np.ndarray,
                      logits: np.ndarray | None) -> Scores:
        """Sidecar mode: the classifier ran elsewhere; score its features (and logits)."""
        check_feature_tensors(features, logits, loaded)
        self.check_count(len(features), "rows")
        return await anyio.to_thread.run_sync(self._score_features, loaded, features, logits)

    # ------------------------------------------------------------ the batch worker

    def run_batch(self, jobs: list[Job]) -> list[Scores | ServiceError]:
        """The batch function: decode what is still encoded, then one runtime call and one
        scoring per bank in the batch; each job gets its own row (an image that does not
        decode gets its error, and fails only its request)."""
        out: list[Scores | ServiceError | None] = [None] * len(jobs)
        groups: dict[tuple[int, bool], list[tuple[int, np.ndarray]]] = {}
        for i, job in enumerate(jobs):
            image = job.image
            if isinstance(image, bytes):
                try:
                    image = self.decoder.decode(image, job.loaded.input_shape, job.prefix)
                except ServiceError as exc:
                    out[i] = exc
                    continue
            groups.setdefault((id(job.loaded), image.dtype == np.uint8), []).append((i, image))
        for (_, is_uint8), members in groups.items():
            loaded = jobs[members[0][0]].loaded
            stacked = np.stack([image for _, image in members])
            x = to_model_input(stacked) if is_uint8 else stacked
            t0 = time.perf_counter()
            o = loaded.runtime.run(x)
            s = scores_of(loaded, o)
            metrics.INFERENCE_DURATION.observe(time.perf_counter() - t0)
            loaded.metrics.record(s, o.concepts)
            for j, (i, _) in enumerate(members):
                out[i] = s.rows(slice(j, j + 1))
        return out  # type: ignore[return-value]

    def _score_features(self, loaded: Loaded, features: np.ndarray,
                        logits: np.ndarray | None, record: bool = True) -> Scores:
        with np.errstate(all="ignore"):  # overflow is checked below, not warned about
            if logits is None:
                logits = loaded.head_logits(features)
            concepts = loaded.concepts_from_features(features)
            check_finite("logits computed from the features", logits)
            check_finite("concept scores computed from the features", concepts)
            s = score(loaded.bank.monitor, logits, features, concepts)
        for name in ("trust", "p_misclassification", "p_anomaly", "p_adversarial",
                     "contributions"):
            check_finite(f"{name} computed from these inputs", getattr(s, name))
        check_finite("probabilities computed from these inputs", s.probabilities)
        if record:
            loaded.metrics.record(s, concepts)
        return s

    # ------------------------------------------------------------ warm-up

    def warm_up(self, loaded: Loaded) -> None:
        """Every route's first call, done before the worker reports ready (blocking; no
        metrics recorded): image decode and resize, the runtime and scoring on a batch, the
        sidecar path with and without logits (it loads the classifier head)."""
        from conceptguard.imaging import encode_probe_png

        channels, size, _ = loaded.input_shape
        decoded = self.decoder.decode(encode_probe_png(size, channels), loaded.input_shape)
        x = to_model_input(decoded[None])
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
