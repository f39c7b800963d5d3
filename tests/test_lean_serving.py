"""Lean serving: the ONNX path imports no torch (the bank's classifier hash is checked
without building the model; a linear head runs in numpy), in a fresh interpreter and in the
session's real server process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, ServerProcess

HEAVY = ("torch", "torchvision", "matplotlib", "open_clip", "sentence_transformers",
         "transformers")


def test_onnx_serving_path_imports_no_torch(demo_bank_dir: Path) -> None:
    code = f"""
import sys, numpy as np
from pathlib import Path
import service.app, service.grpc_server
from service.settings import load_settings
from service.runtime_state import load
loaded = load(Path({str(demo_bank_dir)!r}), load_settings(backend="onnx", device="cpu"))
out = loaded.runtime.run(np.zeros((2, *loaded.input_shape), np.float32))
assert loaded.head_logits(out.features).shape == out.logits.shape
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))
assert not heavy, heavy
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_real_onnx_server_maps_no_libtorch(server: ServerProcess) -> None:
    maps = Path(f"/proc/{server.process.pid}/maps")
    if not maps.exists():
        pytest.skip("no /proc here")
    assert "libtorch" not in maps.read_text()


def test_torch_free_hash_agrees_with_the_torch_path(demo_bank_dir: Path,
                                                    tmp_path: Path) -> None:
    from conceptguard.classifier.hashing import verify_classifier_hash
    from conceptguard.classifier.io import verify_classifier_file

    path = demo_bank_dir / "classifier.safetensors"
    spec, digest = verify_classifier_hash(path)
    spec_t, digest_t, _ = verify_classifier_file(path)
    assert (spec, digest) == (spec_t, digest_t)
    bad = tmp_path / "c.safetensors"
    shutil.copy(path, bad)
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="hash mismatch"):
        verify_classifier_hash(bad)
    with pytest.raises(ValueError, match="hash mismatch"):
        verify_classifier_file(bad)


def test_numpy_linear_head_equals_the_torch_head(demo_bank) -> None:
    import torch

    from conceptguard.classifier.io import load_classifier
    from service.sidecar_head import onnx_head_weights

    class _Stub:  # the fields onnx_head_weights reads
        runtime = type("R", (), {"name": "onnx"})()
        bank = demo_bank
        num_classes = demo_bank.manifest.dims.classes
        feature_dim = demo_bank.manifest.dims.features

    weight, bias = onnx_head_weights(_Stub())  # type: ignore[arg-type, misc]
    z = np.random.default_rng(0).normal(size=(5, _Stub.feature_dim)).astype(np.float32)
    model = load_classifier(demo_bank.classifier_path)[0]
    with torch.inference_mode():
        want = model.head_logits(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(z @ weight.T + bias, want, rtol=1e-5, atol=1e-5)
