"""The concept competence check as stored in a bank: check-concepts writes it into the
manifest and metrics.json without touching the checked files, the bank still loads, and the
v1 response names concepts only for a competent predicted class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conceptguard.bank import load_bank, sha256_file
from conceptguard.concepts import ConceptSet, load_concept_set
from offline.concept_check import store
from tests.conftest import DEMO_BANK


@pytest.fixture()
def bank_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "bank"
    shutil.copytree(DEMO_BANK, dst)
    return dst


def test_store_adds_the_check_without_a_rebuild(bank_copy: Path) -> None:
    before = {n: sha256_file(bank_copy / n) for n in ("tensors.safetensors",
                                                      "classifier.onnx",
                                                      "classifier.safetensors")}
    comp = {"threshold": 0.8, "classes": {"Bag": {"vlm_accuracy": 0.9, "model_accuracy": 0.95,
                                                  "competent": True}}, "pairs": {}}
    store(bank_copy, comp, {"competent_pairs": 0, "note": "x"})
    bank = load_bank(bank_copy)  # checksums, shapes, hash: all still valid
    assert bank.manifest.model_extra["concept_competence"] == comp
    for n, h in before.items():
        assert sha256_file(bank_copy / n) == h
    metrics = json.loads((bank_copy / "report" / "metrics.json").read_text())
    assert metrics["concepts"]["competent_pairs"] == 0
    assert "misclassification" in metrics  # the rest kept


def test_clothing_set_carries_a_valid_class_to_concept_table() -> None:
    cs = load_concept_set("clothing")
    manifest = json.loads((DEMO_BANK / "manifest.json").read_text())
    assert set(cs.class_concepts) == set(manifest["classes"])
    for names in cs.class_concepts.values():
        assert len(names) >= 3 and set(names) <= set(cs.names)
    raw = cs.model_dump()
    raw["class_concepts"] = {"Bag": ["a concept nobody defined"]}
    with pytest.raises(ValueError, match="unknown concepts"):
        ConceptSet.model_validate(raw)


def _bag_competent_only() -> tuple[object, object]:
    """A stand-in bank (the demo manifest, whose check lets only Bag name concepts) and the
    scores of two inputs predicted Bag and Coat."""
    from types import SimpleNamespace

    from conceptguard.bank import Manifest
    from conceptguard.scoring import Scores

    raw = json.loads((DEMO_BANK / "manifest.json").read_text())
    classes = raw["classes"]
    raw["concept_competence"] = {
        "threshold": 0.8,
        "classes": {c: {"vlm_accuracy": 0.9 if c == "Bag" else 0.6, "model_accuracy": 0.9,
                        "competent": c == "Bag"} for c in classes}, "pairs": {}}
    manifest = Manifest.model_validate(raw)
    k = len(manifest.concept_names)
    n = 2
    fields = {f: np.zeros(n) for f in Scores.__dataclass_fields__}
    fields["risks"] = {}
    fields.update(predictions=np.array([classes.index("Bag"), classes.index("Coat")]),
                  probabilities=np.full((n, len(classes)), 0.1),
                  contributions=np.tile(np.linspace(-1, 1, k), (n, 1)),
                  reject=np.array([False, False]), paper_rule_reject=np.array([False, False]),
                  reason=["accepted", "accepted"])
    loaded = SimpleNamespace(classes=classes, concept_names=manifest.concept_names,
                             manifest=manifest)
    return loaded, Scores(**fields)


def test_v1_names_concepts_only_for_competent_classes() -> None:
    from types import SimpleNamespace

    from service.codecs import v1_rows as rows

    loaded, scores = _bag_competent_only()
    out = rows(loaded, scores, SimpleNamespace(reason_concepts=3, top_k=3))
    bag, coat = out[0]["reason"], out[1]["reason"]
    assert len(bag["concepts"]) == 3 and "concepts_unavailable" not in bag
    assert coat["concepts"] == [] and "Coat" in coat["concepts_unavailable"]
    assert "0.60" in coat["concepts_unavailable"] and "no concepts named" in coat["summary"]


def test_v2_reason_outputs_pass_the_same_check_as_v1() -> None:
    """v2's reason_concepts / reason_contributions name concepts only where v1 does; a row
    whose class the check rules out keeps the [N, k] shape with "" and 0.0."""
    from types import SimpleNamespace

    from service.codecs import output_array, v1_rows

    loaded, scores = _bag_competent_only()
    v1 = v1_rows(loaded, scores, SimpleNamespace(reason_concepts=3, top_k=3))
    dtype, shape, names = output_array("reason_concepts", loaded, scores, 3)
    assert (dtype, shape) == ("BYTES", [2, 3])
    assert [n.decode() for n in names[0]] == [c["concept"] for c in v1[0]["reason"]["concepts"]]
    assert names[0].tolist() != [b""] * 3 and names[1].tolist() == [b""] * 3
    dtype, shape, values = output_array("reason_contributions", loaded, scores, 3)
    assert (dtype, shape) == ("FP32", [2, 3])
    want = np.array([c["contribution"] for c in v1[0]["reason"]["concepts"]], np.float32)
    assert np.array_equal(values[0], want) and np.abs(values[0]).min() > 0
    assert values[1].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.slow
def test_build_bank_stage_returns_the_check_and_its_metrics() -> None:
    """The build-bank stage on a state holding just what it reads (synthetic concept scores
    of two views, the demo classifier's head and the demo bank's aligner)."""
    from types import SimpleNamespace

    from conceptguard.classifier.io import load_classifier
    from offline.pipeline import concept_check_stage

    bank = load_bank(DEMO_BANK)
    model, _, _ = load_classifier(DEMO_BANK / "classifier.safetensors")
    cs = load_concept_set("clothing")
    classes = bank.manifest.classes
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 30)
    k = len(cs.names)
    o = rng.normal(size=(300, k))
    o[np.arange(300), y] += 4.0  # concept c marks class c in both views
    s = o + 0.1 * rng.normal(size=(300, k))
    feats = rng.normal(size=(300, bank.manifest.dims.features)).astype(np.float32)
    batch = SimpleNamespace
    state = SimpleNamespace(
        served_outputs=SimpleNamespace(outs={
            "reference": batch(concepts=s, labels=y),
            "calibration": batch(features=feats, labels=y)}),
        projection=SimpleNamespace(o_ref=o), classifier=SimpleNamespace(model=model),
        aligner=SimpleNamespace(aligner=SimpleNamespace(W=bank.tensors["aligner.W"])),
        vlm=SimpleNamespace(T=bank.tensors["concepts.T"], concept_set=cs),
        data=SimpleNamespace(classes=classes))
    ctx = SimpleNamespace(cfg=SimpleNamespace(seed=0))
    comp, metrics = concept_check_stage(ctx, state)
    assert metrics["competent_pairs"] == metrics["pairs"] == 45
    assert set(comp["classes"]) == set(classes)
    first = comp["pairs"][f"{classes[0]}|{classes[1]}"]
    assert {c["concept"] for c in first["concepts"]} >= {cs.names[0], cs.names[1]}
    assert metrics["faithfulness_ratio"] > 0 and 0 <= metrics["plausibility"] <= 1


def test_a_config_with_another_vlm_is_refused() -> None:
    """check-concepts on a bank must embed with the bank's VLM: a different image size,
    top-k or inversion gives another competence (the run stored it in the manifest)."""
    from offline.concept_check import vlm_differences

    stored = {"backend": "conse", "model": "m", "pretrained": None, "image_size": 112,
              "top_k": 10, "batch_size": 64, "device": "cpu", "invert": False}
    assert vlm_differences(stored, {**stored, "batch_size": 8, "device": "cuda"}) == []
    assert vlm_differences(stored, {**stored, "image_size": 224, "invert": True}) == \
        ["image_size", "invert"]
    assert vlm_differences(None, stored) == []
