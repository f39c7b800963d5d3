"""Foreign (out-of-distribution) image sets that need no download: generated, or bundled
inside an installed package. Every set returns uint8 ``(N, H, W, C)`` at the size asked for.

| set | what it is |
|---|---|
| digits | scikit-learn's bundled handwritten digits (1,797 8x8 scans), upsampled |
| shapes | filled and outlined ellipses, rectangles and triangles on a random background |
| glyphs | letters and symbols drawn with Pillow's bundled font, scaled up |
| noise | smooth random noise: upsampled low-resolution uniform noise |
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ForeignSet = Callable[[int, int, int, np.random.Generator], np.ndarray]


def _finish(gray: list[np.ndarray], channels: int) -> np.ndarray:
    x = np.stack(gray).astype(np.uint8)[..., None]
    return np.repeat(x, channels, axis=-1) if channels == 3 else x


def digits(n: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    images = load_digits().images  # (1797, 8, 8) in 0..16
    pick = rng.choice(len(images), size=n, replace=n > len(images))
    out = []
    for i in pick:
        img = Image.fromarray((images[i] * (255 / 16)).astype(np.uint8))
        out.append(np.asarray(img.resize((size, size), Image.BILINEAR)))
    return _finish(out, channels)


def shapes(n: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    out = []
    for _ in range(n):
        img = Image.new("L", (size, size), int(rng.integers(0, 80)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, size // 2, 2)
            w, h = rng.integers(size // 4, size // 2 + 1, 2)
            x1, y1 = x0 + w, y0 + h
            fill = int(rng.integers(100, 256))
            kind = int(rng.integers(0, 3))
            filled = rng.random() < 0.6
            box = [int(x0), int(y0), int(x1), int(y1)]
            if kind == 0:
                draw.ellipse(box, fill=fill if filled else None, outline=fill, width=2)
            elif kind == 1:
                draw.rectangle(box, fill=fill if filled else None, outline=fill, width=2)
            else:
                pts = [(int(x0), int(y1)), (int(x1), int(y1)), (int((x0 + x1) // 2), int(y0))]
                draw.polygon(pts, fill=fill if filled else None, outline=fill)
        out.append(np.asarray(img))
    return _finish(out, channels)


_GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789#@%&?"


def glyphs(n: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    font = ImageFont.load_default(size=max(8, int(size * 0.8)))
    out = []
    for _ in range(n):
        img = Image.new("L", (size, size), 0)
        ch = _GLYPHS[int(rng.integers(0, len(_GLYPHS)))]
        ImageDraw.Draw(img).text((size // 2, size // 2), ch, fill=int(rng.integers(150, 256)),
                                 font=font, anchor="mm")
        out.append(np.asarray(img))
    return _finish(out, channels)


def noise(n: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    out = []
    for _ in range(n):
        cells = int(rng.integers(3, 9))
        low = (rng.random((cells, cells)) * 255).astype(np.uint8)
        out.append(np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC)))
    return _finish(out, channels)


FOREIGN_SETS: dict[str, ForeignSet] = {"digits": digits, "shapes": shapes, "glyphs": glyphs,
                                       "noise": noise}


def foreign_images(name: str, n: int, size: int, channels: int, seed: int) -> np.ndarray:
    """``n`` images of foreign set ``name`` at ``size`` x ``size`` with ``channels``."""
    if name not in FOREIGN_SETS:
        raise ValueError(f"unknown foreign set {name!r}; known: {sorted(FOREIGN_SETS)}")
    if n == 0:
        return np.zeros((0, size, size, channels), np.uint8)
    return FOREIGN_SETS[name](n, size, channels, np.random.default_rng(seed))
