"""A pure reader for the IDX format (MNIST, Fashion-MNIST), gzipped or not.

Layout: two zero bytes, a dtype code, the number of dimensions, then one big-endian uint32 per
dimension, then the data in C order (big-endian for multi-byte types). Nothing is ever unpickled.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"
HEADER_PREFIX = b"\x00\x00"

#: IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file (gzip detected by its magic bytes, not the suffix) into a numpy array.

    Raises ``ValueError`` naming the file when the header is invalid or the data is truncated.
    """
    path = Path(path)
    return parse_idx(_read_bytes(path), name=str(path))


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the (already decompressed) bytes of an IDX file; ``name`` is used in errors."""
    dtype, shape, offset = _parse_header(data, name)
    count = int(np.prod(shape, dtype=np.int64))
    expected = offset + count * dtype.itemsize
    if len(data) < expected:
        raise ValueError(f"{name}: truncated IDX data: header promises shape {shape} "
                         f"({expected} bytes), file has {len(data)} bytes")
    if len(data) > expected:
        raise ValueError(f"{name}: {len(data) - expected} unexpected trailing bytes after "
                         f"IDX data of shape {shape}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: corrupt or truncated gzip stream: {error}") from error


def _parse_header(data: bytes, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(data) < 4 or not data.startswith(HEADER_PREFIX):
        raise ValueError(f"{name}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{name}: unsupported IDX dtype code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{name}: IDX file declares zero dimensions")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{name}: truncated IDX header ({len(data)} bytes, need {offset})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return IDX_DTYPES[code], shape, offset
