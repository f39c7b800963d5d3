"""The helpers every layer shares: the atomic write and the image-layout conversion."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from conceptguard.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from conceptguard.imaging import to_model_input


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_the_file_and_publishes_it(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "out.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert _mode(target) == 0o644
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no leftovers


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half way"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("half way")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_mode_none_keeps_the_private_mode(tmp_path: Path) -> None:
    target = tmp_path / "cache.safetensors"
    with atomic_path(target, mode=None) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".cache.safetensors.")
        tmp.write_bytes(b"x")
    assert _mode(target) == 0o600


def test_the_one_layout_conversion_matches_torch_bit_for_bit() -> None:
    torch = pytest.importorskip("torch")
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    images[0, :, :, 1] = images[0, :, :, 1].T  # channels differ: the layout matters
    x = to_model_input(images)
    assert x.dtype == np.float32 and x.shape == (1, 3, 16, 16) and x.flags.c_contiguous
    reference = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).numpy()
    assert np.array_equal(x.view(np.uint32), reference.view(np.uint32))
