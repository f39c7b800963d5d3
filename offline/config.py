"""The job's one typed configuration, read from YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from conceptguard.attacks import AttackSpec
from conceptguard.calibration import CalibrationSpec
from conceptguard.data import DataSpec, SplitSpec
from conceptguard.foreign import FOREIGN_SETS
from conceptguard.shifts import CORRUPTIONS
from conceptguard.vlm import VLMSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifierConfig(_Strict):
    path: Path = Path("models/demo-resnet.safetensors")


class TrainConfig(_Strict):
    """``conceptguard train-demo``: the demo ResNet on the classifier-train split."""

    epochs: int = 4
    batch_size: int = 128
    lr: float | None = None  # None: the training module's default
    widths: list[int] = Field(default_factory=lambda: [16, 32, 64, 128])


def _default_attacks() -> list[AttackSpec]:
    return [AttackSpec(kind="fgsm", eps=0.05, steps=1),
            AttackSpec(kind="pgd", eps=0.05, steps=10),
            AttackSpec(kind="pgd", eps=0.1, steps=10),
            AttackSpec(kind="apgd", eps=0.03, steps=10),
            AttackSpec(kind="pgd_l2", eps=1.0, steps=10),
            AttackSpec(kind="cw", c=1.0, steps=50),
            AttackSpec(kind="deepfool", steps=10),
            AttackSpec(kind="square", eps=0.05, steps=200)]


def _default_fit_attacks() -> list[AttackSpec]:
    return [AttackSpec(kind="fgsm", eps=0.05, steps=1),
            AttackSpec(kind="pgd", eps=0.05, steps=10),
            AttackSpec(kind="pgd_l2", eps=1.0, steps=10),
            AttackSpec(kind="cw", c=1.0, steps=50),
            AttackSpec(kind="square", eps=0.05, steps=200)]


class AdversarialConfig(_Strict):
    """``attacks``: evaluated on the test split. ``fit_attacks``: run on the calibration
    split for the fitting stream. ``heatmap_attack``: run on the reference split for H_adv
    (its family is then not fully held out in the evaluation, and metrics.json says so)."""

    attacks: list[AttackSpec] = Field(default_factory=_default_attacks)
    fit_attacks: list[AttackSpec] = Field(default_factory=_default_fit_attacks)
    heatmap_attack: AttackSpec = Field(
        default_factory=lambda: AttackSpec(kind="fgsm", eps=0.05, steps=1))
    # correctly classified test (and reference) inputs per attack
    per_split: int = Field(1000, ge=1)
    # correctly classified calibration inputs per fitting attack
    fit_per_attack: int = Field(400, ge=1)
    limits: dict[str, int] = Field(default_factory=lambda: {"deepfool": 120})  # slow kinds


class ShiftConfig(_Strict):
    """Common corruptions (``conceptguard.shifts``); each image gets a severity from
    ``severities`` in turn."""

    kinds: list[str] = Field(default_factory=lambda: list(CORRUPTIONS))
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    fit_per_kind: int = Field(400, ge=1)  # calibration images per corruption (fitting stream)
    test_per_kind: int = Field(1000, ge=1)  # test images per corruption (evaluation)


class ForeignConfig(_Strict):
    """Foreign image sets (``conceptguard.foreign``)."""

    fit_sets: list[str] = Field(default_factory=lambda: ["shapes", "glyphs", "noise"])
    test_sets: list[str] = Field(default_factory=lambda: ["digits", "shapes", "glyphs",
                                                          "noise"])
    fit_per_set: int = Field(400, ge=1)
    test_per_set: int = Field(1000, ge=1)


class HeatmapConfig(_Strict):
    min_count: int = Field(5, ge=1)  # fewer incorrect/adversarial inputs than this: pooled fallback
    delta: float = 0.25  # binarisation threshold on |D|


class EvaluationConfig(_Strict):
    vlm_test_images: int = Field(2000, ge=1)  # test images the VLM embeds (plus misclassified ones)
    # misclassified test images after the first vlm_test_images that the VLM also embeds
    # (fault localisation); more: a seeded sample of this many, so it does not grow with
    # the test set. None: all of them
    vlm_misclassified_max: int | None = Field(2000, ge=0)
    top_concepts: int = Field(3, ge=1)
    # resamples behind every ci95 (clustered by source image: an image's corrupted and
    # attacked variants are resampled together)
    bootstrap: int = Field(1000, ge=20)
    mixed: dict[str, int] = Field(  # inputs per kind in the mixed evaluation stream
        default_factory=lambda: {"clean": 2000, "corruption": 1000, "attack": 500,
                                 "foreign": 500})
    # inputs per traffic mix (conceptguard.evaluation.COMPOSITIONS: clean-, shift-,
    # attack- and foreign-heavy), drawn from the same scored sets as the mixed stream
    composition_size: int = Field(4000, ge=100)


class JobConfig(_Strict):
    name: str = "fashion-mnist-demo"
    seed: int = 0
    data: DataSpec = Field(default_factory=DataSpec)
    splits: SplitSpec
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    vlm: VLMSpec = Field(default_factory=VLMSpec)
    concepts: str = "clothing"  # a bundled concept set or a YAML/JSON path
    class_prompts: list[str] | None = None  # names used in class prompts (default: classes)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    shifts: ShiftConfig = Field(default_factory=ShiftConfig)
    foreign: ForeignConfig = Field(default_factory=ForeignConfig)
    heatmaps: HeatmapConfig = Field(default_factory=HeatmapConfig)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    cache_dir: Path = Path(".cache/conceptguard")

    @model_validator(mode="after")
    def _names_exist(self) -> JobConfig:
        unknown = [k for k in self.shifts.kinds if k not in CORRUPTIONS]
        unknown += [f for f in self.foreign.fit_sets + self.foreign.test_sets
                    if f not in FOREIGN_SETS]
        if unknown:
            raise ValueError(f"unknown corruption or foreign set(s) {unknown}; known: "
                             f"{sorted(CORRUPTIONS)} and {sorted(FOREIGN_SETS)}")
        if any(not 1 <= s <= 5 for s in self.shifts.severities):
            raise ValueError("shifts.severities must lie in 1..5")
        return self


class ConfigError(ValueError):
    pass


def load_config(path: Path) -> JobConfig:
    """Read and validate a job config; errors name the file and the field."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    try:
        return JobConfig.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(f"config {path} is invalid:\n{exc}") from exc


def config_from_bank(bank: Path) -> JobConfig:
    """The data part of the job config a bank was built with, from its manifest (the data
    source and the split sizes and seed), so that commands reading the bank's splits
    (``diagnose``) need no config file. Raises :class:`ConfigError` when the manifest lacks
    them; callers check ``splits.digest()`` against the manifest's ``splits_digest``."""
    import json

    if not (Path(bank) / "manifest.json").is_file():
        raise ConfigError(f"no bank at {bank} (no manifest.json)")
    try:
        m = json.loads((Path(bank) / "manifest.json").read_text())
        data, splits = m["data"]["spec"], m["data"]["splits"]
        return JobConfig.model_validate({
            "name": m["name"], "seed": m["data"].get("seed", 0), "data": data,
            "splits": {k: splits[k] for k in ("seed", "classifier_train", "fit", "reference",
                                              "calibration", "test")},
            "classifier": {"path": str(Path(bank) / "classifier.safetensors")}})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot take the data config from {bank}/manifest.json ({exc}); "
                          "pass --config") from exc


def classifier_mismatch(cfg: JobConfig, spec: Any) -> str | None:
    """Why the config's data cannot feed the classifier whose spec (a
    :class:`~conceptguard.classifier.spec.ClassifierSpec`) is ``spec``, or None: checked
    before any stage runs, so the message names the setting instead of a tensor shape."""
    if cfg.class_prompts is not None and len(cfg.class_prompts) != spec.num_classes:
        return (f"class_prompts has {len(cfg.class_prompts)} names, the classifier "
                f"{spec.num_classes} classes ({', '.join(spec.classes)}): give one per class, "
                "in the classifier's order, or null for the class names")
    if cfg.data.channels is not None and cfg.data.channels != spec.in_channels:
        return (f"data.channels is {cfg.data.channels}, the classifier takes "
                f"{spec.in_channels}-channel images: set data.channels to {spec.in_channels}")
    if cfg.data.image_size is not None and cfg.data.image_size != spec.input_size:
        return (f"data.image_size is {cfg.data.image_size}, the classifier takes "
                f"{spec.input_size}x{spec.input_size} images: set data.image_size to "
                f"{spec.input_size}")
    return None
