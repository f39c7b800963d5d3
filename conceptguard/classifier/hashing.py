"""The classifier file's integrity hash, computed without torch.

Reads a ``.safetensors`` file directly (8-byte little-endian header length, JSON header,
then the tensors' bytes) and hashes it exactly as :func:`conceptguard.classifier.io.
classifier_hash` hashes the state_dict: sha256 over the sorted ``(name, torch dtype, shape,
bytes)``. The serving path (``conceptguard.bank.load_bank``) uses it, so an ONNX worker never
imports torch or builds the model; the torch path (``io.verify_classifier_file``) agrees
with it (a test checks both on the demo bank).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from conceptguard.classifier.spec import ClassifierSpec

# safetensors dtype codes -> str(torch.dtype), as the hash header spells them
TORCH_DTYPES = {"F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16",
                "BF16": "torch.bfloat16", "I64": "torch.int64", "I32": "torch.int32",
                "I16": "torch.int16", "I8": "torch.int8", "U8": "torch.uint8",
                "BOOL": "torch.bool", "F8_E4M3": "torch.float8_e4m3fn",
                "F8_E5M2": "torch.float8_e5m2"}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str], memoryview, Any]:
    """``(tensor entries, metadata, data buffer, keep-alive)`` of a safetensors file."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise ValueError(f"{path}: not a safetensors file (bad JSON header)") from exc
        size = fh.seek(0, 2)
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(mapped)[8 + n:] if mapped is not None else memoryview(b"")
    return header, metadata, data, mapped


def file_tensors_hash(path: Path) -> tuple[dict[str, str], str]:
    """``(metadata, hash of the tensors)`` of a safetensors file, torch-free."""
    entries, metadata, data, keep = read_safetensors(Path(path))
    digest = hashlib.sha256()
    try:
        for name in sorted(entries):
            e = entries[name]
            try:
                dtype = TORCH_DTYPES[e["dtype"]]
                begin, end = (int(v) for v in e["data_offsets"])
                shape = tuple(int(d) for d in e["shape"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}: tensor {name!r} has an unreadable entry "
                                 f"{e!r}") from exc
            if not 0 <= begin <= end <= len(data):
                raise ValueError(f"{path}: tensor {name!r} lies outside the file")
            header = f"{name}\0{dtype}\0{shape}\0{end - begin}\0"
            digest.update(header.encode())
            digest.update(data[begin:end])
    finally:
        data.release()
        if keep is not None:
            keep.close()
    return metadata, digest.hexdigest()


def spec_from_metadata(metadata: dict[str, str] | None, path: Path
                       ) -> tuple[ClassifierSpec, str]:
    """The spec and the stored hash from a classifier file's safetensors metadata."""
    if not metadata or "spec" not in metadata or "hash" not in metadata:
        raise ValueError(f"{path}: missing metadata 'spec' and/or 'hash'; "
                         "not a file written by save_classifier")
    try:
        spec = ClassifierSpec.model_validate_json(metadata["spec"])
    except ValidationError as err:
        raise ValueError(f"{path}: invalid classifier spec in metadata: {err}") from err
    return spec, metadata["hash"]


def verify_classifier_hash(path: Path) -> tuple[ClassifierSpec, str]:
    """Check a classifier file's stored hash against its tensors without building the model
    (no torch): ``(spec, hash)``; ``ValueError`` names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier file not found: {path}")
    metadata, actual = file_tensors_hash(path)
    spec, stored = spec_from_metadata(metadata, path)
    if actual != stored:
        raise ValueError(f"{path}: hash mismatch (stored {stored[:12]}..., tensors hash to "
                         f"{actual[:12]}...); the file was modified or is corrupt")
    return spec, actual
