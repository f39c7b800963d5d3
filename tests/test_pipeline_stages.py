"""build-bank's stages one at a time on a tiny build state: the runner, the data, classifier,
VLM (a fixture backend), aligner, projection and heatmap stages, the per-image cache, and
the attack stage function against ``run_attack``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conceptguard.calibration import Batch
from conceptguard.classifier.io import ClassifierSpec, build_classifier, save_classifier
from conceptguard.vlm import registry
from offline.build_context import Context
from offline.cache import ArrayCache
from offline.config import JobConfig
from offline.pipeline import (
    BuildState,
    Stage,
    aligner_stage,
    classifier_stage,
    data_stage,
    heatmaps_stage,
    projection_stage,
    run_stages,
    vlm_stage,
)
from tests.fixtures_data import make_fashion_mnist

DIM = 16


class HashVLM:
    """A deterministic stand-in VLM: a fixed random projection of the pixels and of a
    per-text seed (unit rows), fast enough for unit tests."""

    id = "hash-vlm"
    dim = DIM

    def __init__(self) -> None:
        self.calls = 0

    def encode_images(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        self.calls += 1
        x = np.asarray(images, np.float32).reshape(len(images), -1) / 255.0
        w = np.random.default_rng(0).standard_normal((x.shape[1], DIM)).astype(np.float32)
        v = x @ w + 1e-3
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        v = np.stack([np.random.default_rng(sum(map(ord, t))).standard_normal(DIM)
                      for t in texts]).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def hash_vlm() -> HashVLM:
    built = HashVLM()
    registry.register_vlm("test_hash", lambda spec: built, overwrite=True)
    try:
        yield built
    finally:
        registry._REGISTRY.pop("test_hash", None)


@pytest.fixture
def tiny(tmp_path: Path, hash_vlm: HashVLM) -> Context:
    """A config over a generated 80/30-image Fashion-MNIST and an untrained classifier."""
    make_fashion_mnist(tmp_path / "fm", n_train=80, n_test=30)
    spec = ClassifierSpec(arch="small_resnet", num_classes=10, in_channels=1, input_size=28,
                          widths=[4, 8, 8, 8], mean=[0.5], std=[0.25],
                          classes=[str(i) for i in range(10)])
    torch.manual_seed(0)
    save_classifier(build_classifier(spec), spec, tmp_path / "clf.safetensors")
    cfg = JobConfig.model_validate({
        "data": {"source": "fashion_mnist", "root": str(tmp_path / "fm")},
        "splits": {"fit": 30, "reference": 30, "calibration": 10, "test": 30},
        "classifier": {"path": str(tmp_path / "clf.safetensors")},
        "vlm": {"backend": "test_hash"},
        "cache_dir": str(tmp_path / "cache")})
    return Context(cfg, ArrayCache(cfg.cache_dir), progress=False, staging=tmp_path)


def test_the_runner_times_every_stage_and_stores_its_output(tiny: Context) -> None:
    seen = []

    def first(ctx: Context, state: BuildState) -> str:
        seen.append("first")
        return "one"

    def second(ctx: Context, state: BuildState) -> str:
        return state.data + "+two"  # type: ignore[operator]

    state = run_stages(tiny, BuildState(), (Stage("data", first),
                                            Stage("classifier", second, timing="data")))
    assert (state.data, state.classifier) == ("one", "one+two")
    assert list(tiny.timings) == ["data"] and tiny.timings["data"] >= 0
    with pytest.raises(AttributeError):
        _ = state.vlm  # not run yet


def test_data_classifier_vlm_aligner_projection_alone(tiny: Context, hash_vlm: HashVLM
                                                      ) -> None:
    state = BuildState()
    state.data = data_stage(tiny, state)
    assert {k: len(v) for k, v in state.data.ds.items()} == {
        "fit": 30, "reference": 30, "calibration": 10, "test": 30}
    state.classifier = classifier_stage(tiny, state)
    assert state.classifier.z_fit.shape == (30, 8)
    assert state.classifier.z_ref.shape == (30, 8)
    state.vlm = vlm_stage(tiny, state)
    assert state.vlm.v_fit.shape == (30, DIM)
    assert state.vlm.T.shape == (len(state.vlm.concept_set.names), DIM)
    np.testing.assert_allclose(state.vlm.v_fit,
                               HashVLM().encode_images(state.data.ds["fit"].images),
                               rtol=0, atol=4 * DIM * np.finfo(np.float32).eps)
    state.aligner = aligner_stage(tiny, state)
    assert state.aligner.info["fit_n"] == 30
    state.projection = projection_stage(tiny, state)
    p = state.projection
    assert p.tensors["concepts.T"].shape[0] == p.o_ref.shape[1]
    np.testing.assert_allclose(p.o_ref.mean(0), 0, atol=1e-5)

    # a second run of the cached stages computes nothing: features and embeddings are cached
    calls, misses = hash_vlm.calls, len(tiny.cache.misses)
    again = vlm_stage(tiny, state)
    assert hash_vlm.calls == calls and len(tiny.cache.misses) == misses
    np.testing.assert_array_equal(again.v_ref, state.vlm.v_ref)
    np.testing.assert_array_equal(classifier_stage(tiny, state).z_fit, state.classifier.z_fit)


def test_heatmaps_stage_reads_only_its_inputs(tiny: Context) -> None:
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    n, k, c = 60, 5, 3
    labels = np.arange(n) % c
    logits = np.eye(c)[labels] * 3.0  # all right
    ref = Batch(logits.astype(np.float32), rng.standard_normal((n, 4)).astype(np.float32),
                rng.standard_normal((n, k)).astype(np.float32), labels)
    state = BuildState()
    state.data = SimpleNamespace(classes=["a", "b", "c"])  # type: ignore[assignment]
    state.served_outputs = SimpleNamespace(outs={"reference": ref})  # type: ignore[assignment]
    state.adversarial = ref.select(np.zeros(n, bool))
    state.projection = SimpleNamespace(o_ref=ref.concepts * 2)  # type: ignore[assignment]
    out = heatmaps_stage(tiny, state)
    for y in range(c):
        np.testing.assert_allclose(out.model.ok[y], ref.concepts[labels == y].mean(0),
                                   atol=1e-5)
        np.testing.assert_allclose(out.vlm.ok[y], 2 * ref.concepts[labels == y].mean(0),
                                   atol=1e-5)


@pytest.mark.slow  # attacks in two batch layouts
@pytest.mark.parametrize("engine_batch", [256, 7])
def test_attack_stage_equals_run_attack(tiny: Context, engine_batch: int) -> None:
    """The attack stage function, fed by the engine in any slicing that keeps attack batches
    whole, gives run_attack's images (random starts seeded per attack batch)."""
    from conceptguard.attacks import AttackSpec, run_attack
    from conceptguard.classifier.inference import to_tensor
    from conceptguard.classifier.io import load_classifier
    from offline.engine import LocalEngine
    from offline.stages import attack_columns

    model, _, _ = load_classifier(tiny.cfg.classifier.path)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (9, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 9)
    spec = AttackSpec(kind="pgd", eps=0.1, steps=2)
    want = run_attack(model, to_tensor(images), labels, spec, seed=3, batch_size=3,
                      progress=False)
    want_u8 = (want * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    columns = {"image": images, "label": labels, **attack_columns(9, 3, batch_size=3)}
    engine = LocalEngine()
    if engine_batch == 7:  # 7 rows per engine batch would split attack batch [6, 9)
        with pytest.raises(ValueError, match="split across engine batches"):
            engine.map("attack", columns, batch_size=7, classifier=tiny.cfg.classifier.path,
                       attack=spec.model_dump())
        return
    got = engine.map("attack", columns, batch_size=engine_batch,
                     classifier=tiny.cfg.classifier.path, attack=spec.model_dump())
    np.testing.assert_array_equal(got["adversarial"], want_u8)
    np.testing.assert_array_equal(got["label"], labels)


@pytest.mark.parametrize(("section", "field", "value"), [
    ("vlm", "batch_size", 0), ("shifts", "test_per_kind", -5),
    ("adversarial", "per_split", -1), ("foreign", "test_per_set", 0),
    ("evaluation", "vlm_test_images", 0), ("heatmaps", "min_count", 0),
])
def test_sizes_out_of_range_are_refused_when_the_config_loads(
        tmp_path: Path, section: str, field: str, value: int) -> None:
    """Caught with the file and field named, not mid-build as 'range() arg 3 must not be
    zero' or 'negative dimensions are not allowed'."""
    import yaml

    from offline.config import ConfigError, load_config

    demo = Path(__file__).resolve().parents[1] / "configs" / "fashion-mnist-demo.yaml"
    raw = yaml.safe_load(demo.read_text())
    raw.setdefault(section, {})[field] = value
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"odd\.yaml is invalid(.|\n)*{section}\.{field}"):
        load_config(path)
