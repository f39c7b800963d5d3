"""Image folders read as column batches (offline/streaming.py): the rows come in the order
and with the labels of the core's folder listing (conceptguard.data.image_folder), a batch
at a time, pixels unchanged; an empty folder is refused naming it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from offline.streaming import folder_label, image_files, iter_folder, run_streamed
from tests.conftest import encode_png


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Five 4x4 grey images under two class folders (one nested), plus files the listing
    skips: a hidden image and a text file."""
    rng = np.random.default_rng(0)
    names = ["b/2.png", "a/1.png", "a/deeper/0.png", "b/1.png", "a/3.png"]
    images = {n: rng.integers(0, 256, (4, 4, 1), dtype=np.uint8) for n in names}
    for name, img in images.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(encode_png(img))
    (tmp_path / "a" / ".hidden.png").write_bytes(encode_png(images["a/1.png"]))
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    return tmp_path, images


def test_folder_rows_in_path_order_with_class_labels(folder) -> None:
    root, images = folder
    order = ["a/1.png", "a/3.png", "a/deeper/0.png", "b/1.png", "b/2.png"]
    assert [p.relative_to(root).as_posix() for p in image_files(root)] == order
    batches = list(iter_folder(root, channels=1, batch_size=2, classes=["a", "b"]))
    assert [len(b["id"]) for b in batches] == [2, 2, 1]
    out = run_streamed(lambda b: b, iter(batches))
    assert out["id"].tolist() == [0, 1, 2, 3, 4]
    assert out["label"].tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(out["image"], np.stack([images[n] for n in order]))


def test_folder_labels_without_or_outside_the_classes(folder) -> None:
    root, _ = folder
    assert folder_label(root / "b" / "1.png", root, None) == -1
    assert folder_label(root / "b" / "1.png", root, ["a"]) == -1
    assert folder_label(root / "a" / "deeper" / "0.png", root, ["b", "a"]) == 1


def test_an_empty_folder_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        list(iter_folder(tmp_path, channels=1))


def test_a_16_bit_image_is_refused_naming_it_not_clipped(tmp_path: Path) -> None:
    """Pillow's 8-bit conversion clips 16-bit pixels (nearly all white): the folder loader
    refuses such an image by name, as the service refuses it (415 unsupported_mode)."""
    from PIL import Image

    from conceptguard.data.image_folder import load_image

    deep = tmp_path / "deep.png"
    Image.fromarray(np.linspace(0, 60000, 64 * 64).astype(np.uint16).reshape(64, 64)).save(deep)
    with pytest.raises(ValueError, match=r"deep\.png.*'I;16'.*8 bits"):
        load_image(deep, 32, channels=1)
    ok = tmp_path / "ok.png"
    Image.fromarray((np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)).save(ok)
    assert load_image(ok, 32, channels=3).shape == (32, 32, 3)


def test_a_stream_refuses_what_the_data_sources_refuse(tmp_path: Path) -> None:
    """A 16-bit image in a streamed folder is refused with the data sources' message,
    naming the file (an 8-bit conversion would clip it silently)."""
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "a" / "deep.png")
    with pytest.raises(ValueError, match=r"deep\.png.*mode"):
        list(iter_folder(root, channels=1, classes=["a"]))
