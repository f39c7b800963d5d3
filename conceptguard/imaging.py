"""Safe image decoding and the classifier's preprocessing, shared by the service and tests.

Untrusted bytes are checked before pixels are decoded: size limit, a header that PIL
recognises, a pixel-count limit (decompression bombs), a supported mode, complete data.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

SUPPORTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK",
                             "YCbCr"})


class ImageError(ValueError):
    """A client-side problem with an image; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_image"):
        super().__init__(message)
        self.status = status
        self.code = code


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes -> a fully loaded PIL image, or :class:`ImageError`."""
    if not data:
        raise ImageError("empty image payload", 400, "empty")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {max_bytes}", 413,
                         "too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image has {w}x{h} pixels; the limit is {max_pixels}", 413,
                                 "too_many_pixels")
            if img.mode not in SUPPORTED_MODES:
                raise ImageError(f"unsupported image mode {img.mode!r}; supported: "
                                 f"{sorted(SUPPORTED_MODES)}", 415, "unsupported_mode")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image pixel count is over the limit of {max_pixels} "
                         "(decompression bomb?)", 413, "too_many_pixels") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not a decodable image: the bytes are in no format Pillow "
                         "recognises", 400, "not_an_image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}", 400, "corrupt") from exc
    return img


def to_model_array(img: Image.Image, input_size: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 ``(H, W, C)`` at the classifier's size and channel count."""
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (input_size, input_size):
        img = img.resize((input_size, input_size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def to_model_input(arrays: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in [0, 1]."""
    return np.ascontiguousarray(arrays.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def preprocess_bytes(data: bytes, *, input_size: int, channels: int, max_bytes: int,
                     max_pixels: int) -> np.ndarray:
    """One image's bytes -> uint8 ``(H, W, C)`` ready to batch."""
    img = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return to_model_array(img, input_size, channels)
