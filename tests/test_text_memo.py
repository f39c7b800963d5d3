"""The on-disk text-embedding memo (conceptguard.vlm.text_memo): known texts come from the
file, only unknown ones are computed, and a broken, unwritable or switched-off memo only
costs recomputation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conceptguard.vlm.text_memo import ENV, TextMemo, memo_dir


class Counting:
    """A fake encoder: a text's embedding is a deterministic unit vector; it counts texts."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.seen += texts
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts]
        return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)


def test_known_texts_are_read_and_only_new_ones_computed(tmp_path: Path) -> None:
    enc = Counting()
    first = TextMemo("enc-a", tmp_path).encode(["cat", "dog", "cat"], enc)
    assert enc.seen == ["cat", "dog"]  # a repeated text is computed once
    np.testing.assert_array_equal(first[0], first[2])
    again = TextMemo("enc-a", tmp_path).encode(["dog", "cat", "zebra"], enc)
    assert enc.seen == ["cat", "dog", "zebra"]  # another process: only the new text
    np.testing.assert_array_equal(again[0], first[1])  # the stored rows, bit for bit
    np.testing.assert_array_equal(again[1], first[0])
    assert again.dtype == np.float32 and again.shape == (3, 8)
    # another encoder key is another file: nothing shared
    TextMemo("enc-b", tmp_path).encode(["cat"], enc)
    assert enc.seen[-1] == "cat" and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_a_broken_memo_is_recomputed_and_replaced(tmp_path: Path) -> None:
    enc = Counting()
    memo = TextMemo("enc", tmp_path)
    assert memo.path is not None
    memo.path.write_bytes(b"not a safetensors file")
    out = memo.encode(["cat"], enc)
    assert enc.seen == ["cat"] and out.shape == (1, 8)
    TextMemo("enc", tmp_path).encode(["cat"], enc)
    assert enc.seen == ["cat"]  # the rewritten file is read again


def test_an_unwritable_folder_still_answers(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file"  # root writes anywhere: a file where the folder should be
        blocker.write_text("x")
        folder = blocker / "memo"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
    enc = Counting()
    out = TextMemo("enc", folder).encode(["cat", "dog"], enc)
    assert out.shape == (2, 8) and enc.seen == ["cat", "dog"]


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                         ) -> None:
    monkeypatch.setenv(ENV, "off")
    assert memo_dir() is None
    enc = Counting()
    memo = TextMemo("enc")
    assert memo.path is None
    memo.encode(["cat"], enc)
    memo.encode(["cat"], enc)
    assert enc.seen == ["cat", "cat"]
    monkeypatch.setenv(ENV, str(tmp_path / "here"))
    assert memo_dir() == tmp_path / "here"
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert memo_dir() == tmp_path / "xdg" / "conceptguard" / "text-embeddings"
