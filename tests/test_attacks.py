"""FGSM/PGD raise the loss and flip predictions of a trained classifier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conceptguard.attacks import AttackSpec, run_attack
from conceptguard.classifier.inference import to_tensor
from conceptguard.classifier.io import load_classifier
from conceptguard.data import DataSpec, load_source
from tests.tolerance import assert_f32_close


def _setup(demo_bank_path):
    model, _, _ = load_classifier(demo_bank_path / "classifier.safetensors")
    _, test = load_source(DataSpec())
    x = to_tensor(test.images[:128])
    y = test.labels[:128]
    with torch.no_grad():
        keep = model(x).argmax(1).numpy() == y
    return model, x[keep], y[keep]


@pytest.mark.slow  # a 10-step attack on the demo classifier
def test_pgd_raises_loss_and_flips_predictions(demo_bank_path) -> None:
    model, x, y = _setup(demo_bank_path)
    yt = torch.as_tensor(y)
    spec = AttackSpec(kind="pgd", eps=0.1, steps=10)
    adv = run_attack(model, x, y, spec, seed=0, progress=False)
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), yt).item()
        adv_logits = model(adv)
    assert F.cross_entropy(adv_logits, yt).item() > clean_loss + 1.0
    flipped = (adv_logits.argmax(1).numpy() != y).mean()
    assert flipped > 0.5


def test_fgsm_raises_loss_and_is_deterministic(demo_bank_path) -> None:
    model, x, y = _setup(demo_bank_path)
    spec = AttackSpec(kind="fgsm", eps=0.05, steps=1)
    a1 = run_attack(model, x, y, spec, progress=False)
    a2 = run_attack(model, x, y, spec, progress=False)
    assert torch.equal(a1, a2)
    with torch.no_grad():
        yt = torch.as_tensor(y)
        assert F.cross_entropy(model(a1), yt) > F.cross_entropy(model(x), yt)
    assert_f32_close(float((a1 - x).abs().max()), 0.05, terms=2, scale=1.0)  # pixels in [0, 1]


@pytest.mark.slow  # two runs of a 5-restart black-box search on 64 images
def test_pixle_is_sparse_flips_some_predictions_and_is_seeded(demo_bank_path) -> None:
    # the sparse (L0) kind: patches of the image's own pixels moved elsewhere in it
    model, x, y = _setup(demo_bank_path)
    x, y = x[:64], y[:64]
    spec = AttackSpec(kind="pixle", patch=3, steps=5)
    a1 = run_attack(model, x, y, spec, seed=3, progress=False)
    a2 = run_attack(model, x, y, spec, seed=3, progress=False)
    assert torch.equal(a1, a2)
    changed = ((a1 - x).abs() > 0).flatten(1).sum(1)
    assert int(changed.max()) <= x[0].numel() // 10  # a few patches, not the whole image
    with torch.no_grad():
        flipped = (model(a1).argmax(1).numpy() != y).mean()
    assert flipped > 0.0


def test_only_pixle_keys_its_cache_by_patch() -> None:
    # adding the patch field kept the cache keys of every earlier kind
    assert "patch" not in AttackSpec(kind="pgd").cache_fields()
    assert AttackSpec(kind="pixle", patch=5).cache_fields()["patch"] == 5
    assert AttackSpec(kind="pixle", patch=5).name == "pixle_p5"
