"""Bank paths from a request (``POST /v1/bank/reload``) confined to the banks root."""

from __future__ import annotations

import os
from pathlib import Path

from conceptguard.bank import BankError

NAME_MAX = 255  # bytes per path component on common file systems


class BankPathError(BankError):
    """A bank path is empty, malformed or outside the banks root."""


def confine(root: Path, raw: str | Path) -> tuple[Path, str]:
    """``raw`` (relative to ``root``, or absolute) -> (the real path, its id relative to
    ``root``). Refuses empty names, NUL bytes, over-long components and anything outside
    ``root`` (``..``, absolute paths elsewhere, symbolic links leading out) with one
    message that does not say whether the target exists."""
    text = str(raw)
    if not text.strip() or "\x00" in text:
        raise BankPathError("bank path must be a non-empty folder name under the banks root")
    for part in Path(text).parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise BankPathError(f"bank path has a component over {NAME_MAX} bytes")
    candidate = Path(text) if os.path.isabs(text) else root / text
    real = Path(os.path.realpath(candidate))
    if real != root and not real.is_relative_to(root):
        raise BankPathError(f"bank path {text!r} is not under the banks root")
    rel = real.relative_to(root).as_posix()
    return real, rel


def relative_message(message: str, root: Path) -> str:
    """A loader message with the banks root taken out of every path in it."""
    prefix = str(root).rstrip("/") + "/"
    return message.replace(prefix, "").replace(str(root), ".")
