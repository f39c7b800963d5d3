"""A bank from an imported ONNX classifier whose encoder onnx2torch cannot convert: built
with ``build-bank --data --classifier --quick``, without attacks, and saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptguard.bank import load_bank
from tests.test_import_classifier import SIZE, _shrink_classifier

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get(
               "PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "offline.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_classifier_without_gradients_builds_a_bank_without_attacks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    classes = ["ant", "bee", "cat"]
    for c, name in enumerate(classes):  # classes differ in brightness: learnable-ish
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(45):
            img = rng.integers(0, 120, (SIZE, SIZE, 3)) + 60 * c
            Image.fromarray(img.astype(np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    src = _shrink_classifier(tmp_path / "shrink.onnx")
    r = _cli("import-classifier", "--onnx", src, "--classes-from", "data", "--input-size",
             SIZE, "--channels", 3, "--normalisation", "none", "--out", "clf.safetensors",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("build-bank", "--data", "data", "--classifier", "clf.safetensors", "--out",
             "bank", "--quick", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "attacks skipped: no gradients" in r.stderr
    metrics = json.loads((tmp_path / "bank" / "report" / "metrics.json").read_text())
    assert "Shrink" in metrics["attacks_skipped"]
    assert metrics["adversarial"] == {}
    bank = load_bank(tmp_path / "bank")
    assert bank.manifest.attacks == []
    graph = (tmp_path / "bank" / "classifier.onnx").read_bytes()
    assert b"conceptguard.inline" not in graph and b"Shrink" in graph
