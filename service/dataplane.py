"""The protocol-agnostic data plane: decoded requests in, scores out.

Every transport (v1 REST, v2 REST, gRPC) parses its body with :mod:`service.codecs` and
calls this module; it knows nothing about HTTP. The request path, one phase per step:

1. admit: the images take their queue places (:meth:`Batcher.reserve`) before any work, so
   a request the queue cannot take is refused undecoded (the capacity rule is the
   batcher's alone: :meth:`Batcher.has_room`, also asked by the middleware before a body
   is read);
2. decode (:class:`service.codecs.Decoder`): small images are decoded by the batch worker,
   large ones in the thread pool before they are queued;
3. batch run (:meth:`DataPlane.run_batch`, on the single inference thread, or for a lone
   image on the event loop's: :mod:`service.batching`): decode, one
   runtime call per batch (on the bank's fused graph ``monitor.onnx`` it returns every
   score too, :func:`conceptguard.scoring.scores_from_graph`; otherwise it is followed by
   :func:`conceptguard.scoring.score`, the function the offline evaluation uses);
4. each image gets a reference to its row of the batch's :class:`~conceptguard.scoring.Scores`;
   a request whose images ran side by side in one batch gets them back as one slice (a
   view, no copy), which the codecs (:func:`service.codecs.v1_body`,
   :func:`service.codecs.output_array`) turn into bodies. A request whose every image was
   scored is queued for the bank's metrics (observed off the request path:
   :mod:`service.batch_metrics`); one that fails is not counted.

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
from service.batch_metrics import QueueObserver
from service.batching import Batcher
from service.codecs import (
    Decoder,
    check_count,
    check_feature_tensors,
    check_finite,
    where,
)
from service.errors import ServiceError
from service.runtime_state import Loaded, RuntimeState
from service.settings import Settings

__all__ = ["DataPlane", "Job", "Row", "ServiceError", "gather", "scores_of"]

# one image's result: the scores of the batch it ran in, its row there, and the batch's
# concept scores (what the bank's metrics record for the request once it is answered)
Row = tuple[Scores, int, np.ndarray]


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
    pool that decodes large images and serves the sync routes; a lone image may run on the
    event loop's thread instead (see ``__init__``).
    """

    def __init__(self, state: RuntimeState, settings: Settings,
                 alone: Callable[[], bool] | None = None):
        """``alone``: whether no request but the caller's is in progress in this worker (the
        app's HTTP connections know: :mod:`service.admission_hold`); with it, a lone image
        may run on the event loop's thread (``CONCEPTGUARD_INLINE_MAX_MS``,
        :mod:`service.batching`). Without it, every batch runs on the inference thread."""
        self.state = state
        self.settings = settings
        self.decoder = Decoder(settings)
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="conceptguard-inference")
        self.batcher: Batcher[Job, Row] = Batcher(
            self.run_batch, max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_s, queue_size=settings.queue_size,
            observer=QueueObserver(), run_sync=self._run_inference,
            adaptive=settings.adaptive_batching, alone=alone,
            inline_below_s=settings.inline_max_ms / 1000.0, inline_ok=self._cheap)

    def _cheap(self, job: Job) -> bool:
        """A job whose batch run the input size bounds: decoded already, or a small PNG
        (:meth:`Decoder.small`); another image might take long to decode on the loop."""
        image = job.image
        return not isinstance(image, bytes) or self.decoder.small(image,
                                                                  job.loaded.input_shape)

    async def _run_inference(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def start(self) -> None:
        metrics.set_queue_capacity(self.batcher.queue_size)
        await self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def saturated(self) -> bool:
        """True when the queue cannot take one more image now (admission, before reading)."""
        return not self.batcher.has_room(1)

    # ------------------------------------------------------------ entry points
    # the codecs checked the image count where they parsed the request

    async def classify_images(self, loaded: Loaded, blobs: Sequence[bytes]) -> Scores:
        """Encoded image files -> their scores, in order. The images take their queue places
        before they are decoded: a request the queue cannot take is refused undecoded."""
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
        return _answered(loaded, rows)

    async def classify_tensor(self, loaded: Loaded, images: np.ndarray) -> Scores:
        """float32 ``(N, C, H, W)`` images in [0, 1] (checked by
        :func:`service.codecs.image_tensor`) -> their scores."""
        return _answered(loaded, await self.batcher.submit([Job(loaded, x) for x in images]))

    async def monitor(self, loaded: Loaded, features: np.ndarray,
                      logits: np.ndarray | None) -> Scores:
        """Sidecar mode: the classifier ran elsewhere; score its features (and logits)."""
        check_feature_tensors(features, logits, loaded)
        check_count(len(features), self.settings.max_images_per_request, "rows")
        return await anyio.to_thread.run_sync(self._score_features, loaded, features, logits)

    # ------------------------------------------------------------ the batch worker

    def run_batch(self, jobs: list[Job]) -> list[Row | ServiceError]:
        """The batch function: decode what is still encoded, then one runtime call and one
        scoring per bank in the batch; each job gets its row of those scores (an image that
        does not decode gets its error, and fails only its request)."""
        out: list[Row | ServiceError | None] = [None] * len(jobs)
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
            for j, (i, _) in enumerate(members):
                out[i] = (s, j, o.concepts)
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
            loaded.metrics.record((s, concepts))
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
        return scores_from_graph(o.monitor, monitor.threshold, monitor.calibration)
    return score(monitor, o.logits, o.features, o.concepts)


def gather(rows: Sequence[Row]) -> tuple[Scores, np.ndarray]:
    """One request's rows as one :class:`Scores` and its concept scores, in order: the
    batch's when they are all of it, a slice of them (views, no copy) when they ran side by
    side in one batch, else joined."""
    if not rows:
        raise ValueError("gather needs at least one row")
    first, start, concepts = rows[0]
    if start == 0 and len(rows) == len(first) and all(
            s is first and j == k for k, (s, j, _) in enumerate(rows)):
        return first, concepts  # the whole batch was this request's (a lone request)
    if all(s is first and j == start + k for k, (s, j, _) in enumerate(rows)):
        return first.rows(slice(start, start + len(rows))), concepts[start:start + len(rows)]
    return (Scores.concat([s.rows(slice(j, j + 1)) for s, j, _ in rows]),
            np.concatenate([c[j:j + 1] for _, j, c in rows]))


def _answered(loaded: Loaded, rows: Sequence[Row]) -> Scores:
    """A request's scores, recorded in the bank's metrics: only a request whose every image
    was scored is answered, so an image whose request failed (another image of it did not
    decode) is not counted."""
    scores, concepts = gather(rows)
    loaded.metrics.record((scores, concepts))
    return scores
