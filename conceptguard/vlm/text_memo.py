"""An on-disk memo of a fixed text encoder's embeddings, shared by every process of a user.

A VLM's text embeddings are constants of its weights: ConSE embeds the same 1,000
"a photo of a {class}" prompts and the same concept prompts in every build, serve and
check, and loading its text model and encoding those prompts costs seconds of CPU per
process. The memo keeps each embedding under the SHA-1 of its text, in one safetensors file
per encoder (``key`` names the weights and the library versions that computed them), under
``$XDG_CACHE_HOME/conceptguard/text-embeddings`` (``~/.cache`` when unset);
``CONCEPTGUARD_TEXT_MEMO=off`` turns it off, any other value is the folder to use.

A memo is only an optimisation: a file that cannot be read or written is ignored (the texts
are encoded again) and never fails the caller. Files are replaced atomically; two processes
adding at once may each drop the other's new rows, which are then computed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np

from conceptguard.atomic import atomic_path

log = logging.getLogger(__name__)
ENV = "CONCEPTGUARD_TEXT_MEMO"


def memo_dir() -> Path | None:
    """The memo folder, or None when ``CONCEPTGUARD_TEXT_MEMO=off``."""
    value = os.environ.get(ENV, "")
    if value.lower() in {"off", "0", "false", "no"}:
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "conceptguard" / "text-embeddings"


def digest(texts: list[str]) -> np.ndarray:
    """``(N, 20)`` uint8: the SHA-1 of each text's UTF-8 bytes."""
    raw = b"".join(hashlib.sha1(t.encode("utf-8")).digest() for t in texts)
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(texts), 20)


class TextMemo:
    """``encode(texts, compute)``: the memo's rows for known texts, ``compute`` (a list of
    texts -> ``(n, dim)`` float32) for the others, which are then added to the memo."""

    def __init__(self, key: str, folder: Path | None = None) -> None:
        folder = folder if folder is not None else memo_dir()
        self.path = (None if folder is None
                     else folder / f"{re.sub(r'[^A-Za-z0-9._+-]', '_', key)}.safetensors")

    def _read(self) -> dict[bytes, np.ndarray]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            from safetensors.numpy import load_file

            stored = load_file(str(self.path))
            keys, rows = stored["sha1"], stored["embeddings"]
            if keys.ndim != 2 or keys.shape[1] != 20 or len(keys) != len(rows):
                raise ValueError("inconsistent shapes")
            return {k.tobytes(): r for k, r in zip(keys, rows, strict=True)}
        except Exception as exc:  # a memo is never worth failing for
            log.debug("text memo %s ignored: %s", self.path, exc)
            return {}

    def _write(self, known: dict[bytes, np.ndarray]) -> None:
        if self.path is None or not known:
            return
        try:
            from safetensors.numpy import save_file

            keys = np.frombuffer(b"".join(known), dtype=np.uint8).reshape(len(known), 20)
            rows = np.stack(list(known.values())).astype(np.float32, copy=False)
            with atomic_path(self.path) as tmp:
                save_file({"sha1": keys, "embeddings": rows}, str(tmp))
        except Exception as exc:
            log.debug("text memo %s not written: %s", self.path, exc)

    def encode(self, texts: list[str], compute) -> np.ndarray:
        known = self._read()
        keys = [k.tobytes() for k in digest(texts)]
        missing = [i for i, k in enumerate(keys) if k not in known]
        fresh: dict[bytes, np.ndarray] = {}
        if missing:
            todo = list(dict.fromkeys(texts[i] for i in missing))  # unique, in order
            emb = np.asarray(compute(todo), dtype=np.float32)
            fresh = {k.tobytes(): row for k, row in zip(digest(todo), emb, strict=True)}
            self._write({**known, **fresh})
        return np.stack([known.get(k, fresh.get(k)) for k in keys]).astype(np.float32)
