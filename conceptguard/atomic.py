"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Everything that writes a result file goes through :func:`atomic_path`: the content is
written to a temporary file in the same folder, which then replaces the target in one
``os.replace`` (atomic on POSIX within one file system); on any error the temporary file
is removed and the target is left as it was. A folder (a bank, a report) is built in
:func:`staging_dir` and swapped in whole by :func:`replace_folder`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

PUBLIC = 0o644  # the mode of a published file (a temporary file starts at 0o600)


@contextlib.contextmanager
def atomic_path(path: Path, *, suffix: str = ".tmp", mode: int | None = PUBLIC
                ) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller (or a library) to write; when the
    block ends without error it gets ``mode`` (None: keep 0o600) and replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def staging_dir(target: Path, kind: str = "staging") -> Path:
    """A fresh folder beside ``target`` (same file system) to build a folder in, published
    (mode 0o755) for :func:`replace_folder` to swap in; ``kind`` names it
    (``.<target>.<kind>-XXXX``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{kind}-"))
    folder.chmod(0o755)
    return folder


def replace_folder(staging: Path, target: Path) -> None:
    """Swap the finished folder ``staging`` in as ``target`` (same parent) by two renames:
    a reader sees the old folder, for a moment none, then the new one, never a half-written
    one; the old folder is removed after."""
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
