"""import-classifier and init through the real command (``offline.cli.main``): torchvision
checkpoints and ONNX classifiers become classifier files that reproduce the source's logits,
and bad input gets one line and exit status 2 with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from conceptguard.classifier.hashing import verify_classifier_hash
from conceptguard.classifier.importing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_images,
    logits_tolerance,
    read_state_dict,
)
from conceptguard.classifier.io import load_classifier
from offline.cli import main
from offline.config import JobConfig
from offline.folder_config import MIN_PER_CLASS, plan_sizes

CLASSES = ["ant", "bee", "cat"]
SIZE = 32


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _export(model: nn.Module, path: Path, size: int = SIZE, dynamic: bool = True) -> Path:
    model.eval()
    torch.onnx.export(model, (torch.rand(2, 3, size, size),), str(path),
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}} if dynamic else None,
                      opset_version=17, dynamo=False)
    return path


def _source_logits(model: nn.Module, x: np.ndarray, mean, std) -> np.ndarray:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return model.eval()((torch.from_numpy(x) - m) / s).numpy()


def _assert_same_logits(path: Path, source: np.ndarray, x: np.ndarray) -> None:
    model, _, _ = load_classifier(path)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, source, rtol=0, atol=logits_tolerance(source))


def _common(out: Path, normalisation: tuple[str, ...] = ("--normalisation", "imagenet"),
            classes: str = ",".join(CLASSES), size: int = SIZE) -> tuple[str, ...]:
    return ("--classes", classes, "--input-size", str(size), "--channels", "3",
            *normalisation, "--out", str(out))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model("resnet18", weights=None, num_classes=3).eval()


class TinyNet(nn.Module):
    """conv -> pool -> a head written as ``z @ W + b`` (the exporter emits MatMul + Add)."""

    def __init__(self, classes: int = 3, softmax: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, classes))
        self.b = nn.Parameter(torch.randn(classes))
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.conv(x)).mean(dim=(2, 3))
        out = z @ self.w + self.b
        return out.softmax(1) if self.softmax else out


def test_torchvision_state_dict_imports_with_the_same_logits(
        resnet: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "resnet.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}},
               weights)  # a DataParallel checkpoint dict, as training code writes it
    out = tmp_path / "clf.safetensors"
    code, stdout, err = _run(capsys, "import-classifier", "--torchvision", "resnet18",
                             "--weights", weights, *_common(out))
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["max_logit_difference"] <= summary["tolerance"]
    assert "largest logit difference" in err
    spec, digest = verify_classifier_hash(out)
    assert (spec.arch, spec.head_layer, spec.classes) == ("resnet18", "fc", CLASSES)
    assert digest == summary["hash"]
    x = check_images(3, SIZE, n=4, seed=5)
    _assert_same_logits(out, _source_logits(resnet, x, IMAGENET_MEAN, IMAGENET_STD), x)


def test_a_non_resnet_splits_at_its_last_linear_layer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(1)
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None,
                                         num_classes=3).eval()
    weights = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "clf.safetensors"
    mean, std = "0.5,0.4,0.3", "0.2,0.25,0.3"
    code, _, err = _run(capsys, "import-classifier", "--torchvision", "mobilenet_v3_small",
                        "--weights", weights,
                        *_common(out, ("--mean", mean, "--std", std)))
    assert code == 0, err
    spec, _ = verify_classifier_hash(out)
    assert spec.head_layer == "classifier.3" and spec.mean == [0.5, 0.4, 0.3]
    x = check_images(3, SIZE, n=3, seed=6)
    _assert_same_logits(out, _source_logits(model, x, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]), x)


def test_onnx_gemm_head_is_found_and_the_encoder_has_gradients(
        resnet: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx_path = _export(resnet, tmp_path / "resnet.onnx")
    out = tmp_path / "clf.safetensors"
    code, stdout, err = _run(capsys, "import-classifier", "--onnx", onnx_path,
                             *_common(out, ("--normalisation", "none")))
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["feature_dim"] == 512 and "Flatten" in summary["source"]
    x = check_images(3, SIZE, n=4, seed=7)
    want = ort.InferenceSession(str(onnx_path)).run(None, {"input": x})[0]
    _assert_same_logits(out, want, x)
    model, spec, _ = load_classifier(out)
    assert spec.arch == "onnx" and isinstance(model.head, nn.Linear)  # the service's fast path
    xt = torch.from_numpy(x).requires_grad_(True)
    model(xt).max(1).values.sum().backward()  # what the attacks need
    assert xt.grad is not None and float(xt.grad.abs().sum()) > 0


def test_onnx_matmul_add_head_and_a_named_features_tensor(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(2)
    net = TinyNet()
    onnx_path = _export(net, tmp_path / "tiny.onnx")
    out = tmp_path / "clf.safetensors"
    code, _, err = _run(capsys, "import-classifier", "--onnx", onnx_path,
                        *_common(out, ("--normalisation", "none")))
    assert code == 0, err
    x = check_images(3, SIZE, n=4, seed=8)
    _assert_same_logits(out, _source_logits(net, x, [0.0] * 3, [1.0] * 3), x)
    # a softmax after the head: no detectable head, until the features are named
    soft = _export(TinyNet(softmax=True), tmp_path / "soft.onnx")
    bad = tmp_path / "bad.safetensors"
    code, _, err = _run(capsys, "import-classifier", "--onnx", soft,
                        *_common(bad, ("--normalisation", "none")))
    assert code == 2 and "no detectable head" in err and "--features" in err
    assert len(err.strip().splitlines()) == 1 and not bad.exists()
    import onnx
    graph = onnx.load(str(soft)).graph
    feat = next(n.input[0] for n in graph.node if n.op_type == "MatMul")
    # named, the head after them is MatMul + Add + Softmax: not affine in the features, so
    # refused at import (build-bank needs logits = W z + b), not later
    code, _, err = _run(capsys, "import-classifier", "--onnx", soft, "--features", feat,
                        *_common(bad, ("--normalisation", "none")))
    assert code == 2 and "is not affine in the features" in err and feat in err, err
    assert len(err.strip().splitlines()) == 1 and not bad.exists()
    # the same network exported without the softmax, the features named: an affine head
    code, _, err = _run(capsys, "import-classifier", "--onnx", onnx_path, "--features",
                        feat, *_common(out, ("--normalisation", "none")))
    assert code == 0, err
    _assert_same_logits(out, _source_logits(net, x, [0.0] * 3, [1.0] * 3), x)


@pytest.mark.parametrize("case", ["classes", "size", "batch", "channels", "infinite",
                                  "normalisation"])
def test_bad_input_gets_one_line_and_exit_2_and_no_file(
        case: str, resnet: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "clf.safetensors"
    weights = tmp_path / "w.pt"
    torch.save(resnet.state_dict(), weights)
    tv = ("import-classifier", "--torchvision", "resnet18", "--weights", weights)
    if case == "classes":
        argv, expect = (*tv, *_common(out, classes="a,b,c,d")), "4 class names"
    elif case == "size":  # a graph fixed at 32 x 32 asked for 64
        onnx_path = _export(resnet, tmp_path / "fixed.onnx")
        argv = ("import-classifier", "--onnx", onnx_path, *_common(out, size=64))
        expect = "takes 32 x 32 inputs, --input-size says 64"
    elif case == "batch":
        onnx_path = _export(resnet, tmp_path / "batch2.onnx", dynamic=False)
        argv = ("import-classifier", "--onnx", onnx_path, *_common(out))
        expect = "batch axis is fixed at 2"
    elif case == "channels":
        argv = (*tv, "--classes", "a,b,c", "--input-size", "32", "--channels", "1",
                "--mean", "0.5", "--std", "0.5", "--out", out)
        expect = "1 channels"
    elif case == "infinite":
        argv = (*tv, "--classes", "a,b,c", "--input-size", "32", "--channels", "3",
                "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,inf", "--out", out)
        expect = "must be finite numbers"
    else:
        argv, expect = (*tv, *_common(out, normalisation=())), "normalisation missing"
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert expect in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".clf*"))


def test_a_model_that_rejects_the_input_size(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = torchvision.models.get_model("alexnet", weights=None, num_classes=3)
    weights = tmp_path / "alexnet.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "clf.safetensors"
    code, _, err = _run(capsys, "import-classifier", "--torchvision", "alexnet", "--weights",
                        weights, *_common(out, size=16))
    assert code == 2 and "rejects inputs of 3 x 16 x 16" in err, err
    assert not out.exists()


def test_read_state_dict_refuses_a_pickled_model(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), path)  # a whole module: needs unpickling code
    with pytest.raises(ValueError, match="weights_only=True"):
        read_state_dict(path)


# ------------------------------------------------------------------ init and sizes


def _folder(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conceptguard.classifier.io import build_classifier, save_classifier
    from conceptguard.classifier.spec import ClassifierSpec

    spec = ClassifierSpec(arch="small_resnet", num_classes=3, in_channels=3, input_size=16,
                          widths=[4, 4, 4, 4], mean=[0.5] * 3, std=[0.25] * 3,
                          classes=CLASSES)
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    save_classifier(build_classifier(spec), spec, path)
    return path


def test_init_writes_a_valid_config_whose_splits_scale_with_the_folder(
        tiny_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path / "data", {"ant": 50, "bee": 60, "cat": 70})
    cfg_path = tmp_path / "cfg.yaml"
    code, _, err = _run(capsys, "init", "--data", data, "--classifier", tiny_classifier,
                        "--out", cfg_path)
    assert code == 0, err
    text = cfg_path.read_text()
    assert text.count("#") > 20  # commented
    cfg = JobConfig.model_validate(yaml.safe_load(text))
    n_train = 180 - sum(round(0.2 * n) for n in (50, 60, 70))
    s = cfg.splits
    assert s.fit + s.reference + s.calibration == n_train and s.test is None
    assert cfg.data.image_size == 16 and cfg.data.channels == 3
    assert cfg.adversarial.fit_per_attack == s.calibration
    code, _, err = _run(capsys, "init", "--data", data, "--classifier", tiny_classifier,
                        "--out", cfg_path)
    assert code == 2 and "--force" in err
    other = tmp_path / "other.yaml"  # a concept set that is neither bundled nor a file
    code, _, err = _run(capsys, "init", "--data", data, "--classifier", tiny_classifier,
                        "--concepts", "nosuchset", "--out", other)
    assert code == 2 and "'nosuchset'" in err and "bundled: " in err and not other.exists()


def test_init_refuses_an_empty_class_and_foreign_classes(
        tiny_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = _folder(tmp_path / "empty", {"ant": 40, "bee": 40, "cat": 0})
    out = tmp_path / "cfg.yaml"
    code, _, err = _run(capsys, "init", "--data", empty, "--classifier", tiny_classifier,
                        "--out", out)
    assert code == 2 and "['cat'] hold no images" in err and len(err.splitlines()) == 1
    other = _folder(tmp_path / "other", {"ant": 40, "bee": 40, "dog": 40})
    code, _, err = _run(capsys, "init", "--data", other, "--classifier", tiny_classifier,
                        "--out", out)
    assert code == 2 and "do not match the classifier's head" in err
    split = tmp_path / "split"  # train/ and test/, the test part missing a class
    _folder(split / "train", {"ant": 40, "bee": 40, "cat": 40})
    _folder(split / "test", {"ant": 10, "bee": 10})
    code, _, err = _run(capsys, "init", "--data", split, "--classifier", tiny_classifier,
                        "--out", out)
    assert code == 2 and "test: class folder(s) ['cat'] are missing" in err, err
    assert not out.exists()


def test_plan_sizes_scale_cap_and_refuse_tiny_classes() -> None:
    few_hundred = plan_sizes(np.full(10, 240), 600, [str(i) for i in range(10)])
    assert (few_hundred.fit, few_hundred.reference, few_hundred.calibration) == (800, 800, 800)
    assert few_hundred.attack_test == 600 and few_hundred.attack_fit == 400
    big = plan_sizes(np.full(10, 5000), 20_000, [str(i) for i in range(10)])
    assert (big.fit, big.calibration, big.test, big.n_test) == (4000, 4000, 10_000, 10_000)
    with pytest.raises(ValueError, match=f"at least {MIN_PER_CLASS}"):
        plan_sizes(np.array([100, MIN_PER_CLASS - 1]), 50, ["a", "b"])


@pytest.mark.parametrize("odd", ["my data #1", "x: y", "on", "{data}", "it's [a] 'b'"])
def test_init_quotes_every_name_and_path_it_writes(odd: str) -> None:
    """A folder, classifier or concept file named like YAML syntax (a comment, a mapping, a
    boolean, a flow mapping, quotes) reads back from the written config as itself."""
    import yaml

    from offline.config import JobConfig
    from offline.folder_config import render_config

    sizes = plan_sizes(np.full(3, 240), 300, ["a", "b", "c"])
    text = render_config(sizes, root=Path(f"/data/{odd}"), classifier=Path(f"/m/{odd}.pt"),
                         name=odd, size=32, channels=3, concepts=f"/c/{odd}.yaml",
                         n_train=720, n_classes=3, config=f"{odd}.yaml")
    raw = yaml.safe_load(text)
    assert raw["name"] == odd and raw["data"]["root"] == f"/data/{odd}"
    assert raw["classifier"]["path"] == f"/m/{odd}.pt"
    assert raw["concepts"] == f"/c/{odd}.yaml"
    assert JobConfig.model_validate(raw).name == odd


def test_a_graph_onnx2torch_cannot_convert_is_refused_by_name() -> None:
    import onnx
    from onnx import TensorProto, helper

    from conceptguard.classifier.onnx_module import convert_graph

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    with pytest.raises(ValueError, match="onnx2torch cannot convert"):
        convert_graph(onnx.ModelProto.SerializeToString(model))


def _shrink_classifier(path: Path, classes: int = 3) -> Path:
    """conv -> Shrink (ONNX Runtime runs it, onnx2torch 1.5 does not convert it) -> global
    average pool -> flatten -> Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.normal(size=(classes, 8)).astype(np.float32), "fw"),
             numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "fb")]
    nodes = [helper.make_node("Conv", ["input", "cw"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Shrink", ["c"], ["s"], lambd=0.1, bias=0.05),
             helper.make_node("GlobalAveragePool", ["s"], ["p"]),
             helper.make_node("Flatten", ["p"], ["z"]),
             helper.make_node("Gemm", ["z", "fw", "fb"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "shrink", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                        ["b", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", classes])],
        initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_unconvertible_encoder_runs_in_onnx_runtime_and_exports_inlined(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conceptguard.classifier.onnx_module import has_gradients
    from conceptguard.export import MonitoredClassifier, export_onnx
    from conceptguard.projection import PROJECTION_KEYS

    src = _shrink_classifier(tmp_path / "shrink.onnx")
    out = tmp_path / "clf.safetensors"
    code, stdout, err = _run(capsys, "import-classifier", "--onnx", src,
                             *_common(out, ("--normalisation", "none")))
    assert code == 0, err
    assert json.loads(stdout)["gradients"] is False
    assert "Shrink" in err and "skip the attacks" in err
    x = check_images(3, SIZE, n=4, seed=9)
    want = ort.InferenceSession(str(src)).run(None, {"input": x})[0]
    _assert_same_logits(out, want, x)
    model, _, _ = load_classifier(out)
    assert not has_gradients(model)
    # exported for serving, the ONNX Runtime part is inlined: one plain graph
    d, k, m = model.feature_dim, 4, 5
    rng = np.random.default_rng(0)
    projection = {"aligner.W": rng.normal(size=(d, m)), "aligner.b": np.zeros(m),
                  "concepts.T": rng.normal(size=(k, m)), "projection.mu": np.zeros(k),
                  "projection.sigma": np.ones(k)}
    assert set(projection) == set(PROJECTION_KEYS)
    graph = tmp_path / "classifier.onnx"
    export_onnx(MonitoredClassifier(model, projection), model.input_shape, graph)
    logits, features, _ = ort.InferenceSession(str(graph)).run(None, {"images": x})
    np.testing.assert_allclose(logits, want, rtol=0, atol=logits_tolerance(want))
    assert features.shape == (4, d)
