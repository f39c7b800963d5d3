"""``export_onnx`` on its own: a tiny random classifier plus projection, exported, then run
by ONNX Runtime against the torch module (names, dynamic batch, values, atomic write)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conceptguard.classifier.io import ClassifierSpec, build_classifier
from conceptguard.export import INPUT_NAME, OUTPUT_NAMES, MonitoredClassifier, export_onnx
from conceptguard.projection import project_features
from conceptguard.runtime import OnnxRuntime

K, M = 5, 12  # concepts, VLM dimension


@pytest.fixture(scope="module")
def module() -> MonitoredClassifier:
    torch.manual_seed(0)
    spec = ClassifierSpec(arch="small_resnet", num_classes=3, in_channels=1, input_size=16,
                          widths=[4, 4, 8, 8], mean=[0.5], std=[0.25], classes=["a", "b", "c"])
    clf = build_classifier(spec).eval()
    rng = np.random.default_rng(0)
    t = rng.normal(size=(K, M))
    projection = {
        "aligner.W": rng.normal(size=(8, M)).astype(np.float32),
        "aligner.b": rng.normal(size=M).astype(np.float32),
        "concepts.T": (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32),
        "projection.mu": rng.normal(scale=0.1, size=K).astype(np.float32),
        "projection.sigma": rng.uniform(0.5, 1.5, size=K).astype(np.float32),
    }
    return MonitoredClassifier(clf, projection).eval()


def test_export_names_shapes_and_values(module: MonitoredClassifier, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "graph.onnx"
    export_onnx(module, (1, 16, 16), path)
    assert path.is_file()
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["graph.onnx"]  # no tmp left
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == [INPUT_NAME]
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    rt = OnnxRuntime(path, device="cpu")
    for n in (1, 5):  # a batch size other than the export's dummy batch of 2
        x = np.random.default_rng(n).uniform(size=(n, 1, 16, 16)).astype(np.float32)
        out = rt.run(x)
        with torch.no_grad():
            logits, z, s = module(torch.from_numpy(x))
        assert out.logits.shape == (n, 3) and out.features.shape == (n, 8)
        assert out.concepts.shape == (n, K)
        np.testing.assert_allclose(out.logits, logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out.features, z.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out.concepts, s.numpy(), rtol=1e-3, atol=1e-3)
        # the graph's concept scores are the core's projection of the graph's features
        proj = {k: getattr(module, k.replace(".", "_")).numpy() for k in (
            "aligner.W", "aligner.b", "concepts.T", "projection.mu", "projection.sigma")}
        np.testing.assert_allclose(out.concepts, project_features(out.features, proj),
                                   rtol=1e-3, atol=1e-3)


def test_export_failure_leaves_no_file(module: MonitoredClassifier, tmp_path: Path) -> None:
    path = tmp_path / "graph.onnx"
    with pytest.raises(Exception):  # noqa: B017 - wrong input shape: torch raises
        export_onnx(module, (3, 16, 16), path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
