"""VLM backends and data sources from another package, through entry points: a fake
distribution (a folder on ``sys.path`` with a ``*.dist-info`` holding ``entry_points.txt``)
adds one of each without any code in this package."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conceptguard.data import registry as data_registry
from conceptguard.data.base import DataSpec
from conceptguard.data.registry import load_source, open_source
from conceptguard.vlm import VLMSpec, create_vlm
from conceptguard.vlm import registry as vlm_registry

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "cg_fake_plugin"

PLUGIN = '''
import numpy as np

from conceptguard.data.base import ArrayDataset


class TinyVLM:
    """Every image and text maps to the same unit vector."""

    dim = 4

    def __init__(self, spec):
        self.id = f"tiny-vlm@{spec.image_size}px"

    def encode_images(self, images, progress=False):
        return np.tile(np.eye(1, self.dim, dtype=np.float32), (len(images), 1))

    def encode_texts(self, texts):
        return np.tile(np.eye(1, self.dim, dtype=np.float32), (len(texts), 1))


def build(spec):
    return TinyVLM(spec)


def load(spec):
    images = np.full((6, 8, 8, 1), 7, np.uint8)
    ds = ArrayDataset("tiny", images, np.array([0, 1, 0, 1, 0, 1]), ["a", "b"])
    return ds, ds


load.downloadable = True


def not_callable_either():
    pass


NOT_CALLABLE = 3
'''

ENTRY_POINTS = f"""[conceptguard.vlm_backends]
tiny_vlm = {PACKAGE}:build
conse = {PACKAGE}:build

[conceptguard.data_sources]
tiny_source = {PACKAGE}:load
broken_source = {PACKAGE}:NOT_CALLABLE
"""


def fake_distribution(root: Path) -> Path:
    """``root`` as a site folder holding one installed distribution, cg-fake-plugin 0.1."""
    (root / PACKAGE).mkdir(parents=True)
    (root / PACKAGE / "__init__.py").write_text(PLUGIN)
    info = root / "cg_fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cg-fake-plugin\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = fake_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    try:
        yield root
    finally:
        for name in ("tiny_vlm",):
            vlm_registry._REGISTRY.pop(name, None)
        for name in ("tiny_source", "broken_source"):
            data_registry.LOADERS.pop(name, None)
            data_registry.DOWNLOADABLE.discard(name)
        sys.modules.pop(PACKAGE, None)


def test_a_fake_distribution_adds_a_backend_and_a_source(
        plugin_on_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="conceptguard"):
        added_vlms = vlm_registry.load_entry_points(again=True)
        added_sources = data_registry.load_entry_points(again=True)
    assert added_vlms == ["tiny_vlm"]  # "conse" is built in: kept, the entry point skipped
    assert any("'conse'" in r.getMessage() and "skipped" in r.getMessage()
               for r in caplog.records)
    assert added_sources == ["broken_source", "tiny_source"]
    assert PACKAGE not in sys.modules  # found, not imported: heavy imports stay lazy

    vlm = create_vlm(VLMSpec(backend="tiny_vlm", image_size=32))
    assert vlm.id == "tiny-vlm@32px"
    assert vlm.encode_texts(["a", "b"]).shape == (2, 4)
    assert vlm_registry._REGISTRY["conse"] is vlm_registry._conse  # the built-in kept

    train, test = load_source(DataSpec(source="tiny_source"))
    assert train.classes == ["a", "b"] and len(test) == 6
    assert int(np.asarray(train.images).max()) == 7
    # the entry point's function says it may download: a missing root is then allowed
    missing = plugin_on_path / "not-yet-downloaded"
    train, _ = open_source(DataSpec(source="tiny_source", root=missing, download=True))
    assert len(train) == 6
    with pytest.raises(TypeError, match=r"broken_source.*not callable"):
        load_source(DataSpec(source="broken_source"))


def test_entry_points_are_found_on_first_use_in_a_fresh_process(tmp_path: Path) -> None:
    """No registration call at all: the spec validates and builds from the entry point."""
    root = fake_distribution(tmp_path / "site")
    code = ("from conceptguard.vlm import VLMSpec, create_vlm\n"
            "from conceptguard.data.base import DataSpec\n"
            "from conceptguard.data.registry import load_source\n"
            "print(create_vlm(VLMSpec(backend='tiny_vlm')).id)\n"
            "print(len(load_source(DataSpec(source='tiny_source'))[0]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["tiny-vlm@112px", "6"]


def test_without_the_distribution_the_names_are_unknown() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown VLM backend 'tiny_vlm'"):
        VLMSpec(backend="tiny_vlm")
    with pytest.raises(ValidationError, match="unknown data source 'tiny_source'"):
        DataSpec(source="tiny_source")


def test_the_report_names_the_backend_that_ran() -> None:
    from offline.pipeline import CONSE_NOTE, vlm_note  # imports torch: here, not at collection

    assert vlm_note("conse") == CONSE_NOTE
    assert vlm_note("open_clip") == "open_clip"
    assert vlm_note("tiny_vlm") == "tiny_vlm"  # not labelled "open_clip" any more
