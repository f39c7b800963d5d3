"""Image preprocessing shared by the VLM backends: uint8 arrays in, normalised tensors out."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# TensorFlow-style [-1, 1] scaling, used by the EfficientNet-Lite checkpoints.
INCEPTION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
INCEPTION_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


def checked_nhwc(images: np.ndarray) -> np.ndarray:
    """Validate a uint8 batch; ``(N,H,W)`` is read as grayscale ``(N,H,W,1)``."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N,H,W,C) with C = 1 or 3, got {images.shape}")
    return images


def preprocess_images(
    images: np.ndarray,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    invert: bool = False,
) -> torch.Tensor:
    """uint8 ``(N,H,W,C)`` (C = 1 or 3) -> float32 ``(N,3,size,size)``.

    Grayscale is repeated to three channels; ``invert`` maps ``x -> 255 - x`` first (light
    objects on black become dark on white). The whole image is resized to ``size x size``
    (bilinear, antialiased, no crop), scaled to [0, 1] and normalised by ``mean``/``std``.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    arr = np.ascontiguousarray(checked_nhwc(images))
    if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays
        arr = arr.copy()
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    if invert:
        x = 255.0 - x
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    m = torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def l2_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit Euclidean norm."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def embed_in_batches(images: np.ndarray, embed_batch: Callable[[np.ndarray], torch.Tensor],
                     dim: int, batch_size: int, desc: str, progress: bool = False
                     ) -> np.ndarray:
    """Run ``embed_batch`` over ``images`` (any layout :func:`checked_nhwc` accepts) in slices of
    ``batch_size``; float32 ``(N, dim)``, with a progress bar when ``progress``."""
    images = checked_nhwc(images)
    out = np.zeros((len(images), dim), dtype=np.float32)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        batch = images[start:start + batch_size]
        out[start:start + len(batch)] = embed_batch(batch).cpu().numpy()
    return out
