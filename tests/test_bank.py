"""A bank round-trips; a corrupted or mismatched one is refused with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conceptguard.atomic import staging_dir
from conceptguard.bank import BankError, load_bank, probe_images, publish
from conceptguard.classifier.inference import to_tensor
from conceptguard.data import DataSpec, load_source
from conceptguard.projection import project_features
from conceptguard.runtime import OnnxRuntime, TorchRuntime
from conceptguard.scoring import score


@pytest.fixture()
def bank_copy(tmp_path: Path, demo_bank_path: Path) -> Path:
    dst = tmp_path / "bank"
    shutil.copytree(demo_bank_path, dst)
    return dst


def test_bank_round_trips(demo_bank_path: Path) -> None:
    bank = load_bank(demo_bank_path)
    m = bank.manifest
    assert m.dims.classes == len(m.classes) == bank.monitor.num_classes
    assert m.dims.concepts == len(m.concept_names) == bank.monitor.num_concepts
    raw = load_file(str(demo_bank_path / "tensors.safetensors"))
    np.testing.assert_array_equal(raw["heatmaps.model.ok"], bank.monitor.heatmaps.h_ok)
    # value: the calibrated scale (the map of the raw threshold); raw: the trust model's
    # own (a schema-2 bank has no map and no raw: the two are one)
    assert bank.monitor.calibrated_threshold == m.threshold["value"]
    assert bank.monitor.threshold == m.threshold.get("raw", m.threshold["value"])


def test_onnx_torch_and_numpy_paths_agree(demo_bank_path: Path) -> None:
    """The torch backend and the sidecar (numpy float64) path reproduce the served ONNX
    graph up to float32 rounding; the trust scores barely move."""
    bank = load_bank(demo_bank_path)
    _, test = load_source(DataSpec())
    x = to_tensor(test.images[:32]).numpy()
    onnx = OnnxRuntime(bank.onnx_path, device="cpu").run(x)
    from conceptguard.classifier.io import load_classifier
    from conceptguard.export import MonitoredClassifier
    module = MonitoredClassifier(load_classifier(bank.classifier_path)[0], bank.projection())
    eager = TorchRuntime(module, device="cpu").run(x)
    np.testing.assert_allclose(onnx.logits, eager.logits, atol=1e-4)
    np.testing.assert_allclose(onnx.features, eager.features, atol=1e-4)
    numpy_concepts = project_features(onnx.features, bank.projection())
    scale = float(np.abs(numpy_concepts).max())
    np.testing.assert_allclose(onnx.concepts, numpy_concepts, atol=2e-3 * scale)
    np.testing.assert_allclose(eager.concepts, numpy_concepts, atol=2e-3 * scale)
    a = score(bank.monitor, onnx.logits, onnx.features, onnx.concepts)
    b = score(bank.monitor, eager.logits, eager.features, numpy_concepts)
    np.testing.assert_allclose(a.trust, b.trust, atol=5e-3)
    assert a.predictions.tolist() == b.predictions.tolist()


def test_torch_backend_falls_back_to_numpy_scoring_when_the_monitor_does_not_fuse(
        demo_bank_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A monitor the torch module cannot hold (here: MonitorGraph refuses it) is served as
    the classifier graph plus numpy ``score()``, with the reason in the log, not refused."""
    import conceptguard.monitor_graph as mg
    from service.bank_loader import make_runtime
    from service.settings import Settings

    def refuse(monitor: object) -> None:
        raise mg.NotFusable("detector 'plugin' has no fused form")

    monkeypatch.setattr(mg, "MonitorGraph", refuse)
    with caplog.at_level("WARNING", logger="conceptguard.service"):
        rt = make_runtime(load_bank(demo_bank_path),
                          Settings(bank=demo_bank_path, backend="torch", device="cpu",
                                   threads=0))
    assert rt.graph == "classifier"
    assert rt.run(probe_images(load_bank(demo_bank_path))).monitor is None
    assert "detector 'plugin' has no fused form" in caplog.text


def test_offline_sample_matches_a_fresh_scoring(demo_bank_path: Path) -> None:
    bank = load_bank(demo_bank_path)
    sample = json.loads((demo_bank_path / "report" / "test_scores_sample.json").read_text())
    _, test = load_source(DataSpec())
    x = to_tensor(test.images[sample["test_indices"]]).numpy()
    o = OnnxRuntime(bank.onnx_path, device="cpu").run(x)
    s = score(bank.monitor, o.logits, o.features, o.concepts)
    assert s.predictions.tolist() == sample["predictions"]
    np.testing.assert_allclose(s.trust, sample["trust"], atol=1e-5)


def test_corrupted_tensors_are_refused(bank_copy: Path) -> None:
    f = bank_copy / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BankError, match=r"tensors\.safetensors is corrupt"):
        load_bank(bank_copy)


def test_missing_file_and_bad_manifest_are_refused(bank_copy: Path) -> None:
    (bank_copy / "classifier.onnx").unlink()
    with pytest.raises(BankError, match=r"classifier\.onnx is missing"):
        load_bank(bank_copy)
    (bank_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BankError, match="not valid JSON"):
        load_bank(bank_copy)
    with pytest.raises(BankError, match="does not exist"):
        load_bank(bank_copy / "nope")
    with pytest.raises(BankError, match=r"manifest\.json is a file, not a bank folder"):
        load_bank(bank_copy / "manifest.json")


def test_schema_version_and_shapes_are_checked(bank_copy: Path) -> None:
    mpath = bank_copy / "manifest.json"
    manifest = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(BankError, match="schema_version 99"):
        load_bank(bank_copy)
    dims = {**manifest["dims"], "concepts": manifest["dims"]["concepts"] + 1}
    concepts = [*manifest["concepts"], {"name": "extra", "prompts": ["extra"]}]
    mpath.write_text(json.dumps({**manifest, "dims": dims, "concepts": concepts}))
    with pytest.raises(BankError, match="shape"):
        load_bank(bank_copy)


def test_classifier_hash_mismatch_is_refused(bank_copy: Path) -> None:
    with pytest.raises(BankError, match="expected 000000"):
        load_bank(bank_copy, expected_classifier_hash="0" * 64)
    mpath = bank_copy / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["classifier"]["hash"] = "f" * 64
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(BankError, match="classifier hash mismatch"):
        load_bank(bank_copy)


def test_publish_swaps_whole_folders(tmp_path: Path, demo_bank_path: Path) -> None:
    target = tmp_path / "banks" / "demo"
    for marker in ("first", "second"):
        staging = staging_dir(target)
        shutil.copytree(demo_bank_path, staging, dirs_exist_ok=True)
        (staging / "marker").write_text(marker)
        publish(staging, target)
        assert (target / "marker").read_text() == marker
        load_bank(target)
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "demo"]
    assert leftovers == []


def test_shipped_demo_bank_has_every_promised_metric(demo_bank_path: Path) -> None:
    from tests.metrics_keys import missing_keys

    metrics = json.loads((demo_bank_path / "report" / "metrics.json").read_text())
    assert missing_keys(metrics) == []
    assert metrics["classifier"]["test_accuracy"] >= 0.9
    assert metrics["classifier"]["n_test"] == 10000
    for png in ("model_ok.png", "model_bad.png", "model_adv.png", "model_diff.png",
                "model_diff_bin.png", "vlm_ok.png"):
        assert (demo_bank_path / "report" / png).stat().st_size > 10_000


def test_a_build_never_replaces_what_is_not_a_bank(tmp_path: Path) -> None:
    """``build-bank --out`` on a folder of other files (or a file) is refused before any
    work, and the folder is left as it was; absent, empty and bank folders are fine."""
    from conceptguard.bank import BankError, publish, replaceable
    from offline.pipeline import build_bank

    assert replaceable(tmp_path / "new") is None
    (tmp_path / "empty").mkdir()
    assert replaceable(tmp_path / "empty") is None
    (tmp_path / "old-bank").mkdir()
    (tmp_path / "old-bank" / "manifest.json").write_text("{}")
    assert replaceable(tmp_path / "old-bank") is None
    mine = tmp_path / "my-images"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("keep me")
    assert "not a bank" in replaceable(mine)
    assert "not a folder" in replaceable(a_file)
    for target in (mine, a_file):
        with pytest.raises(BankError, match="--out"):
            build_bank(None, target)  # type: ignore[arg-type]  # refused before the config is read
        staging = tmp_path / "staging"
        staging.mkdir(exist_ok=True)
        with pytest.raises(BankError):
            publish(staging, target)
    assert (mine / "notes.txt").read_text() == "important" and a_file.read_text() == "keep me"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging
