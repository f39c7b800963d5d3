"""Classifier layer: encoder/head split, demo ResNet, persistence, ONNX export, training."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from conceptguard.classifier.demo_resnet import small_resnet
from conceptguard.classifier.inference import accuracy, predict, to_tensor
from conceptguard.classifier.io import (
    ClassifierSpec,
    build_classifier,
    classifier_hash,
    load_classifier,
    save_classifier,
)
from conceptguard.classifier.split import (
    SplitClassifier,
    split_by_layer,
    split_torchvision_resnet,
)
from conceptguard.classifier.train import train_classifier
from tests.tolerance import assert_f32_close

FMNIST_MEAN, FMNIST_STD = [0.286], [0.353]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _demo_spec(widths: list[int] | None = None, num_classes: int = 10) -> ClassifierSpec:
    return ClassifierSpec(arch="small_resnet", num_classes=num_classes, in_channels=1,
                          input_size=28, widths=widths, mean=FMNIST_MEAN, std=FMNIST_STD,
                          classes=[f"c{i}" for i in range(num_classes)])


def _demo_classifier(seed: int = 0, widths: list[int] | None = None) -> SplitClassifier:
    torch.manual_seed(seed)
    return build_classifier(_demo_spec(widths)).eval()


def _normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


# --- split ---------------------------------------------------------------------------------


def test_split_torchvision_resnet18_reproduces_model() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    split = split_torchvision_resnet(model, IMAGENET_MEAN, IMAGENET_STD, (3, 32, 32)).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(_normalise(x, IMAGENET_MEAN, IMAGENET_STD))
        logits, z = split.forward_with_features(x)
        assert torch.equal(split.head_logits(split.features(x)), expected)
        assert torch.equal(split(x), expected)
    assert torch.equal(logits, expected)
    assert z.shape == (4, 512)
    assert (split.feature_dim, split.num_classes) == (512, 10)
    assert split.head is model.fc and split.encoder.layer1 is model.layer1  # shared, not copied
    assert "encoder.conv1.weight" in split.state_dict()
    assert "head.weight" in split.state_dict()


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)),
    ).eval()


def test_split_by_layer_reproduces_model() -> None:
    model = _mlp()
    split = split_by_layer(model, "4.2", [0.5], [0.25], (1, 8, 8)).eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        expected = model(_normalise(x, [0.5], [0.25]))
        logits, z = split.forward_with_features(x)
    assert_f32_close(logits.numpy(), expected.numpy(), terms=x[0].numel())
    assert z.shape == (5, 8)
    assert (split.feature_dim, split.num_classes) == (8, 3)
    assert split.head is model[4][2]
    assert isinstance(model[4][2], nn.Linear)  # the original model is left intact


def test_split_by_layer_non_linear_head_probes_dims() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Sequential(nn.Linear(6, 4)))
    split = split_by_layer(model, "2", [0.0], [1.0], (1, 4, 4))
    assert (split.feature_dim, split.num_classes) == (6, 4)
    whole_block = split_by_layer(_mlp(), "4", [0.5], [0.25], (1, 8, 8))  # a container is fine
    assert (whole_block.feature_dim, whole_block.num_classes) == (16, 3)


def test_split_by_layer_rejects_unknown_layer() -> None:
    with pytest.raises(ValueError, match=r"head_layer '4\.9' does not exist"):
        split_by_layer(_mlp(), "4.9", [0.5], [0.25], (1, 8, 8))
    with pytest.raises(ValueError, match="'classifier' does not exist"):
        split_by_layer(_mlp(), "classifier", [0.5], [0.25], (1, 8, 8))


@pytest.mark.parametrize("layer", ["4.0", "0", "1"])
def test_split_by_layer_rejects_non_final_layer(layer: str) -> None:
    with pytest.raises(ValueError, match=f"head_layer '{layer}' is not the final layer"):
        split_by_layer(_mlp(), layer, [0.5], [0.25], (1, 8, 8))


def test_split_rejects_bad_normalisation() -> None:
    with pytest.raises(ValueError, match="mean/std need 3 entries"):
        SplitClassifier(nn.Identity(), nn.Identity(), [0.5], [0.5], (3, 4, 4))


# --- demo ResNet -----------------------------------------------------------------------------


def test_small_resnet_shapes() -> None:
    torch.manual_seed(0)
    model = small_resnet().eval()
    split = split_torchvision_resnet(model, FMNIST_MEAN, FMNIST_STD, (1, 28, 28)).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert model(x).shape == (3, 10)
        logits, z = split.forward_with_features(x)
    assert logits.shape == (3, 10)
    assert z.shape == (3, 128)
    assert (split.feature_dim, split.num_classes) == (128, 10)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)


def test_small_resnet_custom_widths() -> None:
    split = _demo_classifier(widths=[8, 8, 16, 24])
    assert split.feature_dim == 24


# --- io --------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _demo_classifier()
    spec = _demo_spec()
    path = tmp_path / "sub" / "clf.safetensors"
    digest = save_classifier(model, spec, path)
    assert digest == classifier_hash(model)
    assert [p.name for p in path.parent.iterdir()] == ["clf.safetensors"]  # no temp left over
    assert path.stat().st_mode & 0o777 == 0o644  # readable by a service of another user
    loaded, loaded_spec, loaded_hash = load_classifier(path)
    assert loaded_hash == digest == classifier_hash(loaded)
    assert loaded_spec == spec
    assert not loaded.training
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.features(x), model.features(x))


def test_hash_is_deterministic_and_weight_sensitive() -> None:
    a, b = _demo_classifier(seed=1), _demo_classifier(seed=1)
    assert classifier_hash(a) == classifier_hash(b)
    with torch.no_grad():
        b.head.bias[0] += 1e-3
    assert classifier_hash(a) != classifier_hash(b)


def _flip_tensor_byte(path: Path, name: str) -> None:
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    start, _ = header[name]["data_offsets"]
    raw[8 + header_len + start] ^= 0x01
    path.write_bytes(bytes(raw))


def test_tampered_tensor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "clf.safetensors"
    save_classifier(_demo_classifier(), _demo_spec(), path)
    _flip_tensor_byte(path, "head.weight")
    with pytest.raises(ValueError, match="hash mismatch"):
        load_classifier(path)


def test_tampered_metadata_hash_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "clf.safetensors"
    save_classifier(_demo_classifier(), _demo_spec(), path)
    save_file(load_file(path), path, metadata={"spec": _demo_spec().model_dump_json(),
                                               "hash": "0" * 64})
    with pytest.raises(ValueError, match="hash mismatch"):
        load_classifier(path)


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")
    model = _demo_classifier(widths=[8, 8, 8, 8])
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, bare)
    with pytest.raises(ValueError, match="missing metadata"):
        load_classifier(bare)
    wrong_spec = tmp_path / "wrong.safetensors"  # valid hash, but spec says default widths
    save_file(tensors, wrong_spec, metadata={"spec": _demo_spec().model_dump_json(),
                                             "hash": classifier_hash(model)})
    with pytest.raises(ValueError, match="shape/dtype mismatch"):
        load_classifier(wrong_spec)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_classifier(garbage)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="class names"):
        ClassifierSpec(arch="small_resnet", num_classes=3, in_channels=1, input_size=28,
                       mean=[0.5], std=[0.5], classes=["a"])
    with pytest.raises(ValueError, match="extra"):
        ClassifierSpec.model_validate({**_demo_spec().model_dump(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown arch"):
        build_classifier(_demo_spec().model_copy(update={"arch": "resnet9000", "widths": None}))


def test_build_torchvision_arch_with_grayscale_input() -> None:
    spec = ClassifierSpec(arch="resnet18", num_classes=4, in_channels=1, input_size=32,
                          mean=[0.5], std=[0.5], classes=list("abcd"))
    model = build_classifier(spec).eval()
    with torch.no_grad():
        logits, z = model.forward_with_features(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 4) and z.shape == (2, 512)


# --- ONNX ------------------------------------------------------------------------------------


class _LogitsAndFeatures(nn.Module):
    def __init__(self, model: SplitClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_features(x)


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    model = _demo_classifier()
    path = tmp_path / "clf.onnx"
    torch.onnx.export(_LogitsAndFeatures(model).eval(), (torch.rand(2, 1, 28, 28),), str(path),
                      dynamo=False, opset_version=17, input_names=["pixels"],
                      output_names=["logits", "features"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"},
                                    "features": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 1, 28, 28)  # a different batch size than at export
    onnx_logits, onnx_z = session.run(None, {"pixels": x.numpy()})
    with torch.no_grad():
        logits, z = model.forward_with_features(x)
    np.testing.assert_allclose(onnx_logits, logits.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(onnx_z, z.numpy(), rtol=0, atol=1e-4)


# --- inference and training ------------------------------------------------------------------


def _bright_vs_dark(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    low = np.where(labels == 1, 160, 0).reshape(n, 1, 1, 1)
    images = (low + rng.integers(0, 96, (n, 28, 28, 1))).astype(np.uint8)
    return images, labels


def test_to_tensor_and_predict_shapes() -> None:
    images, labels = _bright_vs_dark(10, seed=0)
    x = to_tensor(images)
    assert x.dtype == torch.float32 and x.shape == (10, 1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    model = _demo_classifier()
    model.train()
    logits, z = predict(model, images, batch_size=4)
    assert model.training  # mode restored
    assert logits.dtype == np.float32 and logits.shape == (10, 10)
    assert z.dtype == np.float32 and z.shape == (10, 128)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model.eval()(x).numpy(), rtol=0, atol=1e-5)
    assert accuracy(np.eye(2)[labels], labels) == 1.0
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(images.astype(np.float32))


def _train_tiny(seed: int) -> tuple[SplitClassifier, float, float]:
    images, labels = _bright_vs_dark(256, seed=0)
    torch.manual_seed(123)
    model = build_classifier(_demo_spec(widths=[8, 8, 16, 16], num_classes=2))
    stats = train_classifier(model, images, labels, epochs=2, batch_size=32, seed=seed,
                             progress=False)
    assert stats.epochs == 2 and stats.seconds > 0
    assert not model.training
    test_images, test_labels = _bright_vs_dark(128, seed=1)
    logits, _ = predict(model, test_images)
    return model, stats.train_accuracy, accuracy(logits, test_labels)


@pytest.mark.slow  # trains twice
def test_training_learns_and_is_deterministic() -> None:
    model_a, train_acc, test_acc = _train_tiny(seed=7)
    assert train_acc > 0.9
    assert test_acc > 0.9
    model_b, _, _ = _train_tiny(seed=7)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert classifier_hash(model_a) == classifier_hash(model_b)
