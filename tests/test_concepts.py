"""Concept sets: bundled files, validation, and embeddings with the real ConSE backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from conceptguard.concepts import (
    Concept,
    ConceptSet,
    bundled_concept_sets,
    class_matrix,
    class_texts,
    concept_matrix,
    concept_texts,
    embed_prompts,
    load_concept_set,
)
from conceptguard.vlm import VLMBackend, VLMSpec, create_vlm
from tests.tolerance import assert_f32_close

RIVAL10 = ["long-snout", "wings", "wheels", "text", "horns", "floppy-ears", "ears",
           "colored-eyes", "tail", "mane", "beak", "hairy", "metallic", "rectangular", "wet",
           "long", "tall", "patterned"]
FMNIST = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
          "Bag", "Ankle boot"]


def small_set(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "toy",
        "templates": ["a photo of {}.", "a drawing of {}."],
        "concepts": [{"name": "wheels"}, {"name": "wings", "prompts": ["wings", "a wing"]}],
        "class_templates": ["a photo of a {}."],
    }
    data.update(overrides)
    return data


@pytest.fixture(scope="module")
def conse() -> VLMBackend:
    return create_vlm(VLMSpec(backend="conse"))


def test_bundled_sets_load() -> None:
    assert {"clothing", "rival10"} <= set(bundled_concept_sets())
    clothing = load_concept_set("clothing")
    assert clothing.name == "clothing" and len(clothing) >= 30
    for required in ("sleeves", "long sleeves", "collar", "hood", "zipper", "heel", "laces",
                     "handle", "strap sandal", "open toe", "buckle", "trouser legs"):
        assert required in clothing.names
    assert all(1 <= len(c.prompts) <= 3 for c in clothing.concepts)
    assert set(clothing.class_aliases) == set(FMNIST)


def test_rival10_names_exactly() -> None:
    assert load_concept_set("rival10").names == RIVAL10


def test_load_from_yaml_and_json_files(tmp_path: Path) -> None:
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(small_set()))
    (tmp_path / "toy.json").write_text(json.dumps(small_set()))
    for path in (tmp_path / "toy.yaml", str(tmp_path / "toy.json")):
        cs = load_concept_set(path)
        assert cs.names == ["wheels", "wings"]


def test_unknown_set_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"bundled: .*clothing"):
        load_concept_set("no-such-set")


@pytest.mark.parametrize("overrides, message", [
    ({"concepts": [{"name": "a"}, {"name": "a"}]}, "duplicate concept names"),
    ({"templates": ["a photo of wheels"]}, "placeholder"),
    ({"class_templates": ["a photo"]}, "placeholder"),
    ({"templates": []}, "must not be empty"),
    ({"concepts": []}, "no concepts"),
    ({"concepts": [{"name": "a", "prompts": [" "]}]}, "non-blank"),
    ({"colour": "red"}, "Extra inputs"),
])
def test_validation_errors(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ConceptSet.model_validate(small_set(**overrides))


def test_validation_errors_from_file(tmp_path: Path) -> None:
    """A concept file's errors name the file: invalid fields, broken YAML, broken JSON."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(small_set(concepts=[{"name": "x"}, {"name": "x"}])))
    with pytest.raises(ValueError, match=r"bad\.yaml.*invalid(.|\n)*duplicate"):
        load_concept_set(path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("templates: [a")
    with pytest.raises(ValueError, match=r"broken\.yaml is not readable YAML"):
        load_concept_set(broken)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json is not readable JSON"):
        load_concept_set(broken_json)


def test_concept_texts_cross_prompts_and_templates() -> None:
    cs = ConceptSet.model_validate(small_set())
    assert concept_texts(cs) == [
        ["a photo of wheels.", "a drawing of wheels."],
        ["a photo of wings.", "a drawing of wings.", "a photo of a wing.", "a drawing of a wing."],
    ]
    assert Concept(name="x").phrasings == ["x"]
    assert class_texts(["Bag", "Coat"], ["a {}"], {"Coat": ["coat", "jacket"]}) == [
        ["a Bag"], ["a coat", "a jacket"]]


def test_embed_prompts_is_normalised_group_mean(conse: VLMBackend) -> None:
    groups = [["a photo of a cat", "a photo of a kitten"], ["a photo of a car"]]
    t = embed_prompts(conse, groups)
    u = conse.encode_texts(["a photo of a cat", "a photo of a kitten", "a photo of a car"])
    mean = u[:2].mean(0)
    assert_f32_close(t[0], mean / np.linalg.norm(mean), terms=u.shape[1])
    assert_f32_close(t[1], u[2], terms=u.shape[1])
    with pytest.raises(ValueError):
        embed_prompts(conse, [["a"], []])


def test_concept_and_class_matrices(conse: VLMBackend) -> None:
    for name in ("clothing", "rival10"):
        cs = load_concept_set(name)
        m = concept_matrix(conse, cs)
        assert m.shape == (len(cs), 384) and m.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
    clothing = load_concept_set("clothing")
    w = class_matrix(conse, FMNIST, clothing.class_templates, clothing.class_aliases)
    assert w.shape == (10, 384)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-5)
    assert np.linalg.matrix_rank(w) == 10
