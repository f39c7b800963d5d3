"""The job's one typed configuration, read from YAML."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from conceptguard.attacks import AttackSpec
from conceptguard.calibration import CalibrationSpec
from conceptguard.data import DataSpec, SplitSpec
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


class AdversarialConfig(_Strict):
    attacks: list[AttackSpec] = Field(default_factory=lambda: [
        AttackSpec(kind="fgsm", eps=0.05, steps=1),
        AttackSpec(kind="pgd", eps=0.05, steps=10),
        AttackSpec(kind="pgd", eps=0.1, steps=10),
    ])
    fit_attack: str = "pgd_eps0.05"  # the attack behind H_adv and the adversarial head
    per_split: int = 1000  # correctly classified inputs attacked per split and attack


class HeatmapConfig(_Strict):
    min_count: int = 5  # fewer incorrect/adversarial inputs than this: pooled fallback
    delta: float = 0.25  # binarisation threshold on |D|


class EvaluationConfig(_Strict):
    vlm_test_images: int = 2000  # test images the VLM embeds (plus every misclassified one)
    mixed_adversarial_fraction: float = 0.1
    top_concepts: int = 3


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
    heatmaps: HeatmapConfig = Field(default_factory=HeatmapConfig)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    cache_dir: Path = Path(".cache/conceptguard")

    @model_validator(mode="after")
    def _fit_attack_exists(self) -> JobConfig:
        names = [a.name for a in self.adversarial.attacks]
        if self.adversarial.fit_attack not in names:
            raise ValueError(f"adversarial.fit_attack {self.adversarial.fit_attack!r} is not "
                             f"one of the attacks {names}")
        return self


class ConfigError(ValueError):
    pass


def load_config(path: Path) -> JobConfig:
    """Read and validate a job config; errors name the file and the field."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    try:
        return JobConfig.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(f"config {path} is invalid:\n{exc}") from exc
