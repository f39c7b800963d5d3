"""Safe image decoding and the classifier's preprocessing, shared by the service and tests.

Untrusted bytes are checked before pixels are decoded: size limit, a header in one of the
allowed formats (:data:`ALLOWED_FORMATS`; no other Pillow plugin, e.g. EPS through
Ghostscript, ever sees the bytes), a pixel-count limit (decompression bombs), a supported
mode, complete data. JPEGs are decoded at a reduced scale when the classifier's input is
smaller (DCT scaling: less memory and time); EXIF orientation is applied.
"""

from __future__ import annotations

import io
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
SUPPORTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK",
                             "YCbCr"})


class ImageError(ValueError):
    """A client-side problem with an image; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_image"):
        super().__init__(message)
        self.status = status
        self.code = code


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int,
                 target_size: int | None = None) -> Image.Image:
    """Bytes -> a fully loaded PIL image, upright (EXIF orientation applied), or
    :class:`ImageError`. ``target_size``: the size the image will be resized to; formats
    that can decode at a reduced scale (JPEG) then decode no larger than needed."""
    if not data:
        raise ImageError("empty image payload", 400, "empty")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {max_bytes}", 413,
                         "too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            except UnidentifiedImageError:
                fmt = _sniff_format(data)
                if fmt is not None:
                    raise ImageError(f"image format {fmt} is not accepted; accepted: "
                                     f"{', '.join(ALLOWED_FORMATS)}", 415,
                                     "unsupported_format") from None
                raise
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image has {w}x{h} pixels; the limit is {max_pixels}", 413,
                                 "too_many_pixels")
            if img.mode not in SUPPORTED_MODES:
                raise ImageError(f"unsupported image mode {img.mode!r}; supported: "
                                 f"{sorted(SUPPORTED_MODES)}", 415, "unsupported_mode")
            if target_size is not None and img.format == "JPEG":
                # decode at 1/2, 1/4 or 1/8 scale, never below the target size
                img.draft(img.mode, (target_size, target_size))
            img.load()
            if img.format == "PNG" and not _png_ends_written(img, data):
                short = png_data_shortfall(data)
                if short is not None:
                    raise ImageError(f"corrupt or truncated image: {short}", 400, "corrupt")
            img = _upright(img)
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


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (a phone photo stands as it was taken)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # an unreadable EXIF block is ignored, not fatal
        return img
    if orientation in (None, 1):
        return img
    return ImageOps.exif_transpose(img) or img


_REFUSED_MAGIC = ((b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
                  (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"icns", "ICNS"),
                  (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
                  (b"gimp xcf", "XCF"), (b"SIMPLE  =", "FITS"), (b"DDS ", "DDS"),
                  (b"qoif", "QOI"), (b"P1", "PBM"), (b"P2", "PGM"), (b"P3", "PPM"),
                  (b"P4", "PBM"), (b"P5", "PGM"), (b"P6", "PPM"), (b"P7", "PAM"))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_pixels(data: bytes) -> int | None:
    """Width x height as a PNG's header declares it (the IHDR chunk, which must come
    first), without decoding; None when ``data`` does not start like a PNG."""
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")


# Adam7 passes: (x0, y0, dx, dy)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type


def png_raw_size(width: int, height: int, bit_depth: int, colour_type: int,
                 interlaced: bool) -> int:
    """Bytes of a PNG's decompressed image data: per row one filter byte and the row's
    packed pixels; an interlaced image is seven smaller images (Adam7)."""
    bits = _PNG_CHANNELS.get(colour_type, 4) * bit_depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        w = (width - x0 + dx - 1) // dx if width > x0 else 0
        h = (height - y0 + dy - 1) // dy if height > y0 else 0
        if w and h:
            total += h * (1 + (w * bits + 7) // 8)
    return total


def _png_ends_written(img: Image.Image, data: bytes, small: int = 256 * 256) -> bool:
    """True when a large decoded PNG's last rows prove its data reached the end, so the
    second inflate (:func:`png_data_shortfall`) can be skipped: Pillow leaves the rows it
    never got at zero, and the last row (interlaced: also the last odd row, which Adam7's
    last pass writes) holds a nonzero value. Small images (up to ``small`` pixels) are
    always checked in full: their inflate costs microseconds."""
    w, h = img.size
    if w * h <= small:
        return False
    rows = {h - 1}
    if len(data) > 28 and data[28] == 1 and h > 1:  # IHDR's interlace method: Adam7
        rows.add(h - 1 if (h - 1) % 2 else h - 2)
    for y in rows:
        extrema = img.crop((0, y, w, y + 1)).getextrema()
        bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
        if not any(high for _, high in bands):
            return False
    return True


def png_data_shortfall(data: bytes, piece: int = 1 << 20) -> str | None:
    """Why a PNG's image data is short of what its header declares, or None. Pillow fills
    the rows of a zlib stream that ends early with zeros and reports no error, so an image
    cut inside its compressed data (with the chunks around it intact) would be scored as
    if it were whole. The IDAT chunks are inflated again here, in pieces of ``piece``
    bytes that are counted and dropped (memory stays bounded, whatever the size)."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    expected = png_raw_size(width, height, data[24], data[25], data[28] == 1)
    inflate = zlib.decompressobj()
    got, pos = 0, 8
    while pos + 8 <= len(data) and got < expected:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            chunk = data[pos + 8:pos + 8 + length]
            while chunk and got < expected and not inflate.eof:
                try:
                    got += len(inflate.decompress(chunk, min(piece, expected - got)))
                except zlib.error as exc:
                    return f"the PNG's image data does not inflate ({exc})"
                chunk = inflate.unconsumed_tail
        elif kind == b"IEND":
            break
        pos += 12 + length
    if got < expected:
        return (f"the PNG's image data holds {got} of the {expected} bytes its header "
                f"declares ({width}x{height})")
    return None


def _sniff_format(data: bytes) -> str | None:
    """The name of a well-known refused format (from its magic bytes only: no decoder
    sees the data), for the error message; None otherwise."""
    for magic, name in _REFUSED_MAGIC:
        if data.startswith(magic):
            return name
    return None


def encode_probe_png(size: int, channels: int) -> bytes:
    """A small PNG (a gradient) at the classifier's size, for warm-up calls."""
    x = np.linspace(0, 255, size, dtype=np.float64)
    gray = np.add.outer(x, x[::-1]).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(gray if channels == 1 else np.stack([gray] * 3, axis=-1))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def to_model_array(img: Image.Image, input_size: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 ``(H, W, C)`` at the classifier's size and channel count."""
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (input_size, input_size):
        img = img.resize((input_size, input_size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def to_model_input(arrays: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in [0, 1]: the one image-layout
    conversion (service, offline stages, report evidence; as a torch tensor:
    ``classifier.inference.to_tensor``, also used by training), a correctly rounded float32
    division."""
    return np.ascontiguousarray(arrays.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def preprocess_bytes(data: bytes, *, input_size: int, channels: int, max_bytes: int,
                     max_pixels: int) -> np.ndarray:
    """One image's bytes -> uint8 ``(H, W, C)`` ready to batch."""
    img = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels,
                       target_size=input_size)
    return to_model_array(img, input_size, channels)
