"""Common image corruptions at five severities (after ImageNet-C, sized for small images).

Pure functions on uint8 ``(N, H, W, C)`` batches; every random choice comes from the
``numpy.random.Generator`` passed in, so a (kind, severity, seed) triple names one result.
Strengths are stated for pixel values in ``[0, 1]`` and for a 28-pixel image; spatial ones
scale with the image size.

| kind | what it does (severity 1 -> 5) |
|---|---|
| gaussian_noise | additive N(0, sigma^2), sigma 0.04 -> 0.26 |
| impulse_noise | salt and pepper on 1% -> 12% of pixels |
| gaussian_blur | Gaussian blur, sigma 0.5 -> 1.5 px |
| contrast | pull towards the image mean, keeping 60% -> 12% of the contrast |
| brightness | add 0.1 -> 0.5 |
| inversion | blend with the negative, 20% -> 100% |
| occlusion | a random square, 15% -> 55% of the side, filled with a random grey |
| pixelate | downsample by 1.5 -> 4 and upsample (nearest) |
| jpeg | JPEG at quality 60 -> 8 |
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _level(values: tuple[float, ...], severity: int) -> float:
    if not 1 <= severity <= len(values):
        raise ValueError(f"severity must be 1..{len(values)}, got {severity}")
    return values[severity - 1]


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = _level((0.04, 0.08, 0.12, 0.18, 0.26), severity)
    x = _unit(images)
    return _u8(x + rng.normal(0.0, sigma, x.shape).astype(np.float32))


def impulse_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount = _level((0.01, 0.03, 0.05, 0.08, 0.12), severity)
    out = images.copy()
    u = rng.random(images.shape[:3])
    out[u < amount / 2] = 0
    out[(u >= amount / 2) & (u < amount)] = 255
    return out


def _gauss_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _convolve_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    r = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode="reflect")
    out = np.zeros_like(x)
    n = x.shape[axis]
    for i, w in enumerate(kernel):
        out += w * np.take(xp, np.arange(i, i + n), axis=axis)
    return out


def gaussian_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = _level((0.5, 0.75, 1.0, 1.25, 1.5), severity) * images.shape[1] / 28
    k = _gauss_kernel(sigma)
    return _u8(_convolve_axis(_convolve_axis(_unit(images), k, 1), k, 2))


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    keep = _level((0.6, 0.45, 0.3, 0.2, 0.12), severity)
    x = _unit(images)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return _u8((x - mean) * keep + mean)


def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return _u8(_unit(images) + _level((0.1, 0.2, 0.3, 0.4, 0.5), severity))


def inversion(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    a = _level((0.2, 0.4, 0.6, 0.8, 1.0), severity)
    x = _unit(images)
    return _u8((1 - a) * x + a * (1 - x))


def occlusion(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    frac = _level((0.15, 0.25, 0.35, 0.45, 0.55), severity)
    out = images.copy()
    n, h, w, _ = images.shape
    side = max(1, int(round(frac * min(h, w))))
    ys = rng.integers(0, h - side + 1, n)
    xs = rng.integers(0, w - side + 1, n)
    grey = rng.integers(0, 256, n)
    for i in range(n):
        out[i, ys[i]:ys[i] + side, xs[i]:xs[i] + side] = grey[i]
    return out


def _resize_batch(images: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    out = []
    for img in images:
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        arr = np.asarray(pil.resize(size, resample))
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(out) if out else images.copy()


def pixelate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = _level((1.5, 2.0, 2.5, 3.0, 4.0), severity)
    h, w = images.shape[1:3]
    small = _resize_batch(images, (max(1, int(w / factor)), max(1, int(h / factor))),
                          Image.BOX)
    return _resize_batch(small, (w, h), Image.NEAREST)


def jpeg(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = int(_level((60, 35, 20, 12, 8), severity))
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
            buf, format="JPEG", quality=quality)
        arr = np.asarray(Image.open(buf).convert("L" if img.shape[-1] == 1 else "RGB"))
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(out) if out else images.copy()


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "inversion": inversion,
    "occlusion": occlusion,
    "pixelate": pixelate,
    "jpeg": jpeg,
}


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int) -> np.ndarray:
    """``images`` with corruption ``kind`` at ``severity`` (1..5), seeded."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {sorted(CORRUPTIONS)}")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N,H,W,C) images, got {images.dtype} {images.shape}")
    return CORRUPTIONS[kind](images, severity, np.random.default_rng(seed))
