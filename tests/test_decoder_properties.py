"""Property tests of the image decoder (issue 8, items 1 and 11): whatever the bytes, the
decoder returns a (size, size, C) uint8 array or raises ImageError with a 4xx status, never
anything else; formats outside the allow-list never reach a decoder; EXIF orientation is
applied; a JPEG decoded at reduced scale matches the full decode closely."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conceptguard.imaging import ALLOWED_FORMATS, ImageError, decode_image, preprocess_bytes

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1 << 20}
FAST = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "F"]
WRITERS = {"PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"], "JPEG": ["L", "RGB", "CMYK"],
           "BMP": ["1", "L", "P", "RGB"], "GIF": ["L", "P"], "TIFF": MODES,
           "WEBP": ["RGB", "RGBA"]}


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _check(data: bytes, size: int = 28, channels: int = 1) -> None:
    try:
        out = preprocess_bytes(data, input_size=size, channels=channels, **LIMITS)
    except ImageError as exc:
        assert 400 <= exc.status < 500 and exc.code and str(exc)
        return
    assert out.dtype == np.uint8 and out.shape == (size, size, channels)


@st.composite
def images(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(sorted(WRITERS)))
    mode = draw(st.sampled_from(WRITERS[fmt]))
    w = draw(st.integers(1, 96))
    h = draw(st.integers(1, 96))
    seed = draw(st.integers(0, 2**16))
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(rgb, "RGB").convert(mode if mode not in ("I;16", "F") else "L")
    if mode == "I;16":
        raw = (np.asarray(img, dtype=np.uint16) * 257).astype("<u2").tobytes()
        img = Image.frombytes("I;16", (w, h), raw)
    elif mode == "F":
        img = Image.frombytes("F", (w, h), np.asarray(img, dtype="<f4").tobytes())
    try:
        return _encode(img, fmt)
    except (OSError, ValueError, KeyError):
        return _encode(img.convert("RGB"), "PNG")


@FAST
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape(data: bytes) -> None:
    _check(data)


@FAST
@given(images(), st.sampled_from([1, 3]), st.integers(8, 64))
def test_valid_images_decode_to_the_model_shape(data: bytes, channels: int, size: int) -> None:
    _check(data, size, channels)


@FAST
@given(images(), st.data())
def test_truncated_and_flipped_images_never_escape(data: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(0, len(data)))
    _check(data[:cut])
    flipped = bytearray(data)
    pos = draw.draw(st.integers(0, len(data) - 1))
    flipped[pos] ^= draw.draw(st.integers(1, 255))
    _check(bytes(flipped))


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "ICO", "PCX", "TGA", "SGI", "IM", "DDS"])
def test_formats_outside_the_allow_list_are_refused(fmt: str) -> None:
    assert fmt not in ALLOWED_FORMATS
    img = Image.new("RGB", (16, 16), (10, 200, 30))
    try:
        data = _encode(img, fmt)
    except (OSError, KeyError, ValueError) as exc:  # no writer here (EPS needs Ghostscript)
        if fmt != "EPS":
            pytest.skip(f"Pillow cannot write {fmt}: {exc}")
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    with pytest.raises(ImageError) as info:
        decode_image(data, **LIMITS)
    assert info.value.status in (400, 415)


@pytest.mark.parametrize("orientation, undo", [(3, 2), (6, 1), (8, 3)])
def test_exif_orientation_is_applied(orientation: int, undo: int) -> None:
    rng = np.random.default_rng(orientation)
    upright = rng.integers(0, 256, (20, 12), dtype=np.uint8)
    stored = np.rot90(upright, k=undo)  # how the camera wrote it
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buf, format="PNG", exif=exif)
    decoded = np.asarray(decode_image(buf.getvalue(), **LIMITS))
    np.testing.assert_array_equal(decoded, upright)


def test_large_jpeg_is_decoded_at_reduced_scale_and_matches() -> None:
    x = np.linspace(0, 255, 2000)
    rgb = np.stack([np.add.outer(x, x) / 2, np.add.outer(x, x[::-1]) / 2,
                    np.full((2000, 2000), 90.0)], axis=-1).astype(np.uint8)
    data = _encode(Image.fromarray(rgb), "JPEG")
    limits = {"max_bytes": 1 << 24, "max_pixels": 1 << 24}
    img = decode_image(data, target_size=28, **limits)
    assert max(img.size) <= 2000 // 8 + 1  # DCT scaling: 1/8 of the stored size
    fast = preprocess_bytes(data, input_size=28, channels=3, **limits).astype(int)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (28, 28), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(fast - full).mean() < 3.0


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos + 8 <= len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    import zlib

    return (len(payload).to_bytes(4, "big") + kind + payload
            + (zlib.crc32(kind + payload) & 0xFFFFFFFF).to_bytes(4, "big"))


@FAST
@given(st.sampled_from(WRITERS["PNG"]), st.integers(1, 40), st.integers(1, 40),
       st.booleans(), st.floats(0.0, 0.99))
def test_png_cut_inside_its_compressed_data_is_corrupt(mode: str, w: int, h: int,
                                                      interlace: bool, keep: float) -> None:
    """Pillow fills the rows of a zlib stream that ends early with zeros and reports no
    error; the decoder refuses such a PNG (chunks intact, image data short) as ``corrupt``,
    and accepts the whole one: the expected size holds for every mode and interlacing."""
    import zlib

    from conceptguard.imaging import png_data_shortfall, png_raw_size

    rgb = np.random.default_rng(w * 41 + h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(rgb, "RGB").convert("L" if mode == "I;16" else mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG", interlace=interlace)
    whole = buf.getvalue()
    chunks = _png_chunks(whole)
    ihdr = chunks[0][1]
    raw = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    assert png_raw_size(w, h, ihdr[8], ihdr[9], ihdr[12] == 1) == len(raw)
    assert png_data_shortfall(whole) is None
    # the same chunks, with one IDAT holding a complete zlib stream of the first rows only
    short = _png_chunk(b"IDAT", zlib.compress(raw[:int(len(raw) * keep)]))
    before_end = [_png_chunk(k, p) for k, p in chunks if k not in (b"IDAT", b"IEND")]
    cut = b"\x89PNG\r\n\x1a\n" + b"".join(before_end) + short + _png_chunk(b"IEND", b"")
    assert f"holds {int(len(raw) * keep)} of the {len(raw)} bytes" in png_data_shortfall(cut)
    with pytest.raises(ImageError) as exc:
        decode_image(cut, **LIMITS)
    assert (exc.value.status, exc.value.code) == (400, "corrupt")


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("shape", [(300, 301, 3), (301, 300)])
def test_a_large_png_cut_short_is_corrupt_and_a_whole_one_is_not(
        shape: tuple[int, ...], interlace: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above 256 x 256 pixels the decoder first looks at the last rows (Pillow leaves rows
    it never got at zero) and inflates the data again only when they are blank: a cut
    image is still refused, a whole one passes without the second inflate."""
    import zlib

    rgb = np.random.default_rng(1).integers(1, 256, shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", interlace=interlace)
    whole = buf.getvalue()
    limits = {"max_bytes": 1 << 24, "max_pixels": 1 << 24}
    import conceptguard.imaging as imaging

    real = imaging.png_data_shortfall
    with monkeypatch.context() as m:  # the whole image never reaches the second inflate
        m.setattr(imaging, "png_data_shortfall", lambda *_: pytest.fail("inflated again"))
        assert decode_image(whole, **limits).size == (shape[1], shape[0])
    assert imaging.png_data_shortfall is real
    chunks = _png_chunks(whole)
    raw = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    short = _png_chunk(b"IDAT", zlib.compress(raw[:len(raw) * 9 // 10]))
    cut = b"\x89PNG\r\n\x1a\n" + b"".join(
        _png_chunk(k, p) for k, p in chunks if k not in (b"IDAT", b"IEND")) + short + \
        _png_chunk(b"IEND", b"")
    with pytest.raises(ImageError) as exc:
        decode_image(cut, **limits)
    assert exc.value.code == "corrupt"
