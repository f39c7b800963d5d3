"""Decoding: encoded image files -> the classifier's input size, within a memory budget.

Where an image is decoded depends on its size, so that a request takes one thread hop:

- bodies up to ``CONCEPTGUARD_INLINE_DECODE_BYTES`` (the usual small images) are decoded
  by the batch worker itself, right before the runtime call (:meth:`Decoder.decode`);
- larger bodies are decoded in the thread pool before they are queued
  (:meth:`Decoder.decode_in_pool`), so that one slow decode does not hold up a whole batch.

Either way at most ``CONCEPTGUARD_DECODE_CONCURRENCY`` images are decoded at the same time
per worker (one semaphore around every decode; the pool path leaves one place for the batch
worker when it can), which bounds the decode memory (docs/reliability.md). A decode error
is a :class:`~service.errors.ServiceError` with the decoder's status and code, its message
prefixed with ``image i:`` in a request of several images.
"""

from __future__ import annotations

import logging
import threading

import anyio
import anyio.to_thread
import numpy as np

from conceptguard.imaging import ImageError, preprocess_bytes
from service.errors import ServiceError
from service.settings import Settings

log = logging.getLogger("conceptguard.service")

InputShape = tuple[int, int, int]  # (channels, height, width) of the classifier's input


def where(i: int, n: int) -> str:
    """The prefix that names image ``i`` of ``n`` in an error message."""
    return f"image {i}: " if n > 1 else ""


class Decoder:
    """Decodes untrusted image bytes to uint8 ``(H, W, C)`` at the input size."""

    def __init__(self, settings: Settings):
        self.max_bytes = settings.max_upload_bytes
        self.max_pixels = settings.max_image_pixels
        self.inline_bytes = settings.inline_decode_bytes
        self._budget = threading.BoundedSemaphore(settings.decode_concurrency)
        # the pool path leaves a place for the batch worker's own decodes when there are two
        self._pool = anyio.CapacityLimiter(max(1, settings.decode_concurrency - 1))

    def inline(self, data: bytes) -> bool:
        """True when the batch worker decodes these bytes (small enough)."""
        return len(data) <= self.inline_bytes

    def decode(self, data: bytes, shape: InputShape, prefix: str = "") -> np.ndarray:
        """Blocking decode and resize; :class:`ServiceError` for bad bytes."""
        channels, size, _ = shape
        with self._budget:
            try:
                return preprocess_bytes(data, input_size=size, channels=channels,
                                        max_bytes=self.max_bytes, max_pixels=self.max_pixels)
            except ImageError as exc:
                raise ServiceError(f"{prefix}{exc}", exc.status, exc.code) from exc
            except Exception as exc:  # a decoder bug on hostile bytes is still bad input
                log.warning("image decoder failed: %r", exc)
                raise ServiceError(f"{prefix}could not decode the image: {exc}", 400,
                                   "corrupt") from exc

    async def decode_in_pool(self, data: bytes, shape: InputShape, prefix: str = ""
                             ) -> np.ndarray:
        """:meth:`decode` in the thread pool (for large bodies)."""
        return await anyio.to_thread.run_sync(self.decode, data, shape, prefix,
                                              limiter=self._pool)
