"""A build-bank configuration for an image folder and an imported classifier, with sizes that
scale with the data (``conceptguard init`` writes it; ``build-bank --data`` uses it as is).

The rules (:func:`plan_sizes`), stated in the written file too:
- the monitor's three splits (fit, reference, calibration) take a third of the folder's train
  part each, at most 4,000 each (the demo's sizes); the classifier is trained elsewhere, so
  no split trains it;
- the test part (the folder's ``test/``, or a seeded 20% of each class) is evaluated whole,
  up to 10,000 images;
- every per-kind count (attacked, corrupted and foreign inputs) is the demo's, capped at the
  size of the split it is drawn from;
- a class needs at least :data:`MIN_PER_CLASS` train images, else the build is refused;
- the ``quick`` profile caps everything lower (splits 300, 80 test inputs per kind, two
  attacks, three corruptions) for a first check of a setup in a few minutes.
  Classes with fewer than ``heatmaps.min_count`` misclassified (or successfully attacked)
  reference inputs get the pooled heatmap fallback, and the bank's manifest lists them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_PER_CLASS = 30  # train images per class: ten per monitor split
SPLIT_CAP = 4000
TEST_CAP = 10_000


@dataclass(frozen=True)
class Profile:
    """Caps and families of a build: ``full`` (the demo's per-kind counts) or ``quick``
    (a small bank in a few minutes, to check a setup before the full build)."""

    split_cap: int
    attack_test: int
    attack_fit: int
    shift_test: int
    shift_fit: int
    foreign_test: int
    foreign_fit: int
    vlm_test: int
    mixed: dict[str, int]
    bootstrap: int
    vlm_size: int
    folds: int
    attacks: tuple[str, ...]
    fit_attacks: tuple[str, ...]
    shifts: tuple[str, ...]
    foreign_fit_sets: tuple[str, ...]
    foreign_test_sets: tuple[str, ...]


_ALL_SHIFTS = ("gaussian_noise", "impulse_noise", "gaussian_blur", "contrast", "brightness",
               "inversion", "occlusion", "pixelate", "jpeg")
PROFILES = {
    "full": Profile(
        split_cap=SPLIT_CAP, attack_test=1000, attack_fit=400, shift_test=1000, shift_fit=400,
        foreign_test=1000, foreign_fit=400, vlm_test=2000,
        mixed={"clean": 2000, "corruption": 1000, "attack": 500, "foreign": 500},
        bootstrap=200, vlm_size=112, folds=5,
        attacks=("{kind: fgsm, eps: 0.05, steps: 1}", "{kind: pgd, eps: 0.05, steps: 10}",
                 "{kind: pgd_l2, eps: 1.0, steps: 10}", "{kind: square, eps: 0.05, steps: 100}"),
        fit_attacks=("{kind: fgsm, eps: 0.05, steps: 1}", "{kind: pgd, eps: 0.05, steps: 10}",
                     "{kind: pgd_l2, eps: 1.0, steps: 10}"),
        shifts=_ALL_SHIFTS, foreign_fit_sets=("shapes", "glyphs", "noise"),
        foreign_test_sets=("digits", "shapes", "glyphs", "noise")),
    "quick": Profile(
        split_cap=300, attack_test=80, attack_fit=60, shift_test=80, shift_fit=60,
        foreign_test=80, foreign_fit=60, vlm_test=100,
        mixed={"clean": 200, "corruption": 60, "attack": 40, "foreign": 40},
        bootstrap=30, vlm_size=64, folds=3,
        attacks=("{kind: fgsm, eps: 0.05, steps: 1}", "{kind: pgd, eps: 0.05, steps: 5}"),
        fit_attacks=("{kind: fgsm, eps: 0.05, steps: 1}", "{kind: pgd_l2, eps: 1.0, steps: 5}"),
        shifts=("gaussian_noise", "contrast", "occlusion"), foreign_fit_sets=("shapes", "noise"),
        foreign_test_sets=("digits", "shapes")),
}


@dataclass(frozen=True)
class Sizes:
    fit: int
    reference: int
    calibration: int
    test: int | None  # None: the whole test part
    n_test: int  # test images evaluated
    attack_test: int
    attack_fit: int
    shift_test: int
    shift_fit: int
    foreign_test: int
    foreign_fit: int
    vlm_test: int
    mixed: dict[str, int]


def plan_sizes(train_counts: np.ndarray, n_test: int, classes: list[str],
               profile: Profile = PROFILES["full"]) -> Sizes:
    """The splits and per-kind counts for a folder with ``train_counts[c]`` train images of
    class ``c`` and ``n_test`` test images."""
    few = [(classes[c], int(n)) for c, n in enumerate(train_counts) if n < MIN_PER_CLASS]
    if few:
        name, n = few[0]
        raise ValueError(f"class {name!r} has {n} train images; the monitor needs at least "
                         f"{MIN_PER_CLASS} per class (a third each for its fit, reference and "
                         f"calibration splits)" + (f"; {len(few) - 1} more classes are short"
                                                   if len(few) > 1 else ""))
    if n_test < len(classes):
        raise ValueError(f"the test part has {n_test} images for {len(classes)} classes; "
                         "it needs at least one per class")
    n = int(train_counts.sum())
    third = min(profile.split_cap, n // 3)
    calibration = min(profile.split_cap, n - 2 * third)
    t = min(n_test, TEST_CAP)
    p = profile
    return Sizes(fit=third, reference=third, calibration=calibration,
                 test=None if n_test <= TEST_CAP else TEST_CAP, n_test=t,
                 attack_test=min(p.attack_test, t), attack_fit=min(p.attack_fit, calibration),
                 shift_test=min(p.shift_test, t), shift_fit=min(p.shift_fit, calibration),
                 foreign_test=min(p.foreign_test, t), foreign_fit=min(p.foreign_fit, calibration),
                 vlm_test=min(p.vlm_test, t),
                 mixed={"clean": min(p.mixed["clean"], t),
                        "corruption": min(p.mixed["corruption"], t // 2),
                        "attack": min(p.mixed["attack"], t // 4),
                        "foreign": min(p.mixed["foreign"], t // 4)})


_TEMPLATE = """\
# build-bank configuration for the image folder {root}
# and the classifier {classifier}, written by `conceptguard init`.
# Sizes scale with the data: the folder has {n_train} train and {n_test} test images in
# {n_classes} classes (at least {min_count} per class); profile: {profile}. Run:
#   conceptguard build-bank --config {config} --out banks/{name}
name: {q_name}
seed: 0
data:
  source: image_folder
  root: {q_root}
  image_size: {size}      # the classifier's input size; images are resized to it
  channels: {channels}         # 1 = greyscale, 3 = RGB (the classifier's input channels)
  # without train/ and test/ sub-folders, a seeded share of each class is the test part
  holdout_seed: 0
  holdout_fraction: 0.2
splits:
  # the monitor's splits, a third of the train part each (at most {cap} each); the
  # classifier was trained elsewhere, so none is set aside to train it
  seed: 0
  fit: {fit}            # aligner fit (features -> VLM space)
  reference: {reference}      # heatmaps, class statistics, standardisation
  calibration: {calibration}    # defect heads, combiner, reject threshold
  test: {test}         # null: the whole test part, used for nothing else
classifier:
  path: {q_classifier}
vlm:
  backend: conse         # the packaged VLM (EfficientNet-Lite0 + MiniLM; not CLIP)
  image_size: {vlm_size}
  top_k: 10
# Concepts the VLM scores: a bundled set (clothing, rival10) or a YAML file of your own
# with the same fields (name, templates, class_templates, concepts: [{{name, prompts}}]).
concepts: {q_concepts}
class_prompts: null      # the class names the VLM reads (null: the folder names)
adversarial:
  # gradient attacks need the classifier in torch (torchvision, or ONNX via onnx2torch)
  attacks:               # evaluated on correctly classified test inputs
{attacks}
  fit_attacks:           # on the calibration split, for the fitting stream
{fit_attacks}
  heatmap_attack: {{kind: fgsm, eps: 0.05, steps: 1}}  # reference split, for H_adv
  per_split: {attack_test}        # at most this many test (and reference) inputs per attack
  fit_per_attack: {attack_fit}    # calibration inputs per fitting attack
shifts:
  kinds: [{shifts}]
  severities: [1, 2, 3, 4, 5]
  fit_per_kind: {shift_fit}
  test_per_kind: {shift_test}
foreign:
  fit_sets: [{foreign_fit_sets}]
  test_sets: [{foreign_test_sets}]
  fit_per_set: {foreign_fit}
  test_per_set: {foreign_test}
heatmaps:
  # fallback: a class with fewer misclassified (or successfully attacked) reference inputs
  # than this gets pooled statistics; the manifest lists those classes
  min_count: 5
  delta: 0.25
calibration:
  target: accept_correct  # accept at least this share of correct predictions
  value: 0.95
  folds: {folds}
evaluation:
  vlm_test_images: {vlm_test}
  bootstrap: {bootstrap}
  mixed:                 # inputs per kind in the mixed evaluation stream
    clean: {mix_clean}
    corruption: {mix_corruption}
    attack: {mix_attack}
    foreign: {mix_foreign}
cache_dir: .cache/conceptguard
"""


def render_config(sizes: Sizes, *, root: Path, classifier: Path, name: str, size: int,
                  channels: int, concepts: str, n_train: int, n_classes: int,
                  config: str = "CONFIG.yaml", profile: str = "full") -> str:
    """The commented YAML of a folder build."""
    p = PROFILES[profile]

    def quoted(value: object) -> str:  # a YAML double-quoted scalar (JSON's escapes)
        return json.dumps(str(value), ensure_ascii=False)

    def comment(value: object) -> str:  # a value shown in a comment stays on its line
        return " ".join(str(value).splitlines())

    return _TEMPLATE.format(
        q_name=quoted(name), q_root=quoted(root), q_classifier=quoted(classifier),
        q_concepts=quoted(concepts),
        root=comment(root), classifier=comment(classifier), name=comment(name), size=size,
        channels=channels, n_train=n_train, n_test=sizes.n_test, n_classes=n_classes,
        min_count=MIN_PER_CLASS, cap=p.split_cap, config=comment(config), fit=sizes.fit,
        reference=sizes.reference, calibration=sizes.calibration,
        test="null" if sizes.test is None else sizes.test, attack_test=sizes.attack_test,
        attack_fit=sizes.attack_fit, shift_fit=sizes.shift_fit, shift_test=sizes.shift_test,
        foreign_fit=sizes.foreign_fit, foreign_test=sizes.foreign_test,
        vlm_test=sizes.vlm_test, mix_clean=sizes.mixed["clean"],
        mix_corruption=sizes.mixed["corruption"], mix_attack=sizes.mixed["attack"],
        mix_foreign=sizes.mixed["foreign"], profile=profile, vlm_size=p.vlm_size,
        attacks="\n".join(f"    - {a}" for a in p.attacks),
        fit_attacks="\n".join(f"    - {a}" for a in p.fit_attacks),
        shifts=", ".join(p.shifts), foreign_fit_sets=", ".join(p.foreign_fit_sets),
        foreign_test_sets=", ".join(p.foreign_test_sets), folds=p.folds,
        bootstrap=p.bootstrap)


def folder_config(data: Path, classifier: Path, *, name: str | None = None,
                  concepts: str = "clothing", config: str = "CONFIG.yaml",
                  profile: str = "full") -> tuple[str, str]:
    """``(YAML text, one-line summary)`` for ``data`` and ``classifier``: the folder's
    classes must be the classifier's, in its logit order."""
    from conceptguard.classifier.hashing import verify_classifier_hash
    from conceptguard.concepts import load_concept_set
    from conceptguard.data.image_folder import index_image_folder

    load_concept_set(concepts)  # a bundled name or a readable, valid file, checked now
    spec, _ = verify_classifier_hash(Path(classifier))
    train, test = index_image_folder(Path(data), spec.input_size, channels=spec.in_channels)
    if train.classes != spec.classes:
        raise ValueError(f"the folder's classes {train.classes} do not match the classifier's "
                         f"head {spec.classes} (names and order must agree)")
    counts = np.bincount(train.labels, minlength=len(train.classes))
    sizes = plan_sizes(counts, len(test), train.classes, PROFILES[profile])
    bank_name = name or Path(data).resolve().name
    text = render_config(sizes, root=Path(data), classifier=Path(classifier), name=bank_name,
                         size=spec.input_size, channels=spec.in_channels, concepts=concepts,
                         n_train=int(counts.sum()), n_classes=len(train.classes),
                         config=config, profile=profile)
    summary = (f"{Path(data)}: {int(counts.sum())} train and {len(test)} test images in "
               f"{len(train.classes)} classes -> fit {sizes.fit}, reference {sizes.reference}, "
               f"calibration {sizes.calibration}, test {sizes.n_test} ({profile} profile)")
    return text, summary
