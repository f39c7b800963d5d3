"""Concept sets: named human concepts, their prompts, and their text embeddings.

A concept ``k`` with prompts ``P_k`` and templates ``T`` is embedded as
``t_k = normalise(mean_{p in P_k, t in T} u(t.replace("{}", p)))`` where ``u`` is the VLM's
unit text encoder. Class names are embedded the same way with ``class_templates``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from conceptguard.vlm.base import VLMBackend

PLACEHOLDER = "{}"
BUNDLED_PACKAGE = "conceptguard.concept_sets"


def fill(template: str, text: str) -> str:
    """``template`` with its ``{}`` replaced by ``text`` (no other brace handling)."""
    return template.replace(PLACEHOLDER, text)


def _check_templates(templates: list[str], field: str) -> list[str]:
    if not templates:
        raise ValueError(f"{field} must not be empty")
    for t in templates:
        if PLACEHOLDER not in t:
            raise ValueError(f"{field}: template {t!r} has no '{{}}' placeholder")
    return templates


class Concept(BaseModel):
    """A named concept; ``prompts`` are the phrasings put into the templates (default: name)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    prompts: list[str] = Field(default_factory=list)

    @field_validator("prompts")
    @classmethod
    def _non_blank(cls, prompts: list[str]) -> list[str]:
        if any(not p.strip() for p in prompts):
            raise ValueError("prompts must be non-blank strings")
        return prompts

    @property
    def phrasings(self) -> list[str]:
        return self.prompts or [self.name]


class ConceptSet(BaseModel):
    """Concepts with the templates that embed them, plus templates for class names.

    ``class_aliases`` optionally maps a dataset class name to the phrasings used for it
    (e.g. ``"T-shirt/top": ["t-shirt", "top"]``). ``class_concepts`` optionally maps a class
    name to the concepts a person expects on it (the table that plausibility is judged
    against); every name in it must be one of the set's concepts.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    templates: list[str]
    concepts: list[Concept]
    class_templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."])
    class_aliases: dict[str, list[str]] = Field(default_factory=dict)
    class_concepts: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("templates")
    @classmethod
    def _templates(cls, templates: list[str]) -> list[str]:
        return _check_templates(templates, "templates")

    @field_validator("class_templates")
    @classmethod
    def _class_templates(cls, templates: list[str]) -> list[str]:
        return _check_templates(templates, "class_templates")

    @field_validator("class_aliases")
    @classmethod
    def _aliases(cls, aliases: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, phrasings in aliases.items():
            if not phrasings or any(not p.strip() for p in phrasings):
                raise ValueError(f"class_aliases[{name!r}] must be non-blank phrasings")
        return aliases

    @model_validator(mode="after")
    def _unique_names(self) -> ConceptSet:
        if not self.concepts:
            raise ValueError(f"concept set {self.name!r} has no concepts")
        counts = Counter(c.name for c in self.concepts)
        dupes = sorted(n for n, k in counts.items() if k > 1)
        if dupes:
            raise ValueError(f"concept set {self.name!r}: duplicate concept names {dupes}")
        known = set(counts)
        for cls_name, names in self.class_concepts.items():
            unknown = sorted(set(names) - known)
            if unknown:
                raise ValueError(f"concept set {self.name!r}: class_concepts[{cls_name!r}] "
                                 f"names unknown concepts {unknown}")
        return self

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def __len__(self) -> int:
        return len(self.concepts)


def bundled_concept_sets() -> list[str]:
    """Names of the concept sets shipped in ``conceptguard/concept_sets``."""
    root = resources.files(BUNDLED_PACKAGE)
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir()
                  if p.name.endswith(".yaml"))


def _parse(text: str, suffix: str) -> object:
    return json.loads(text) if suffix == ".json" else yaml.safe_load(text)


def load_concept_set(name_or_path: str | Path) -> ConceptSet:
    """A bundled set by name (``"clothing"``, ``"rival10"``) or a YAML/JSON file; validated."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
            raise ValueError(f"concept set file must be .yaml/.yml/.json, got {path.name!r}")
        try:
            data = _parse(path.read_text(encoding="utf-8"), path.suffix.lower())
        except (ValueError, yaml.YAMLError) as exc:  # JSON, UTF-8 and YAML errors
            raise ValueError(f"concept set {path} is not readable "
                             f"{'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                             f"{exc}") from exc
    elif str(name_or_path) in bundled_concept_sets():
        resource = resources.files(BUNDLED_PACKAGE) / f"{name_or_path}.yaml"
        data = _parse(resource.read_text(encoding="utf-8"), ".yaml")
    else:
        raise ValueError(f"no concept set file or bundled set named {str(name_or_path)!r}; "
                         f"bundled: {', '.join(bundled_concept_sets())}")
    if not isinstance(data, dict):
        raise ValueError(f"concept set {str(name_or_path)!r} must be a mapping")
    try:
        return ConceptSet.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"concept set {str(name_or_path)!r} is invalid:\n{exc}") from exc


def concept_texts(cs: ConceptSet) -> list[list[str]]:
    """Per concept, every prompt x template string."""
    return [[fill(t, p) for p in c.phrasings for t in cs.templates] for c in cs.concepts]


def class_texts(class_names: Sequence[str], templates: Sequence[str],
                aliases: Mapping[str, Sequence[str]] | None = None) -> list[list[str]]:
    """Per class, every phrasing x template string (phrasing = alias list or the name)."""
    _check_templates(list(templates), "templates")
    aliases = aliases or {}
    return [[fill(t, p) for p in aliases.get(c, [c]) for t in templates] for c in class_names]


def embed_prompts(vlm: VLMBackend, groups: Sequence[Sequence[str]]) -> np.ndarray:
    """``(K, dim)`` float32: row k = normalise(mean of the unit text embeddings of group k)."""
    if any(len(g) == 0 for g in groups):
        raise ValueError("every prompt group needs at least one text")
    unique = list(dict.fromkeys(t for g in groups for t in g))
    if not unique:
        return np.zeros((0, vlm.dim), dtype=np.float32)
    index = {t: i for i, t in enumerate(unique)}
    emb = vlm.encode_texts(unique).astype(np.float32, copy=False)
    rows = np.stack([emb[[index[t] for t in g]].mean(axis=0) for g in groups])
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)


def concept_matrix(vlm: VLMBackend, cs: ConceptSet) -> np.ndarray:
    """``(len(cs), dim)`` unit concept embeddings."""
    return embed_prompts(vlm, concept_texts(cs))


def class_matrix(vlm: VLMBackend, class_names: Sequence[str], templates: Sequence[str],
                 aliases: Mapping[str, Sequence[str]] | None = None) -> np.ndarray:
    """``(len(class_names), dim)`` unit class embeddings (zero-shot classifier weights)."""
    return embed_prompts(vlm, class_texts(class_names, templates, aliases))
