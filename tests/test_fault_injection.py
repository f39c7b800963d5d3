"""Fault injection: the variants change only the component they claim, and localisation with
a perfect oracle attributes a head swap to the head and an ablated encoder to the encoder
(the demo classifier on real Fashion-MNIST images; the VLM replaced by class-determined
embeddings, so the encoder view is a real aligner fitted on real features).

The ablation here leaves one channel of the last stage: with the aligner refitted on the
faulty encoder, a partial ablation that leaves the class linearly readable in the remaining
channels is (by the rule) a head fault, and is called one (README, fault injection)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptguard.aligner import fit_aligner
from conceptguard.classifier.inference import predict
from conceptguard.classifier.io import ClassifierSpec, build_classifier, load_classifier
from conceptguard.faults import (
    bias_shift,
    encoder_ablate,
    encoder_bn_drift,
    encoder_erase,
    encoder_merge,
    encoder_noise,
    erasing_projection,
    head_blend,
    head_scale,
    head_swap,
    localisation_accuracy,
    simulated_oracle,
)
from offline.inject_faults import (
    SEVERITIES,
    fault_grid,
    paper_rule_table,
    run_variant,
    summarise,
    summary_table,
    wilson,
)
from tests.conftest import DEMO_BANK


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    spec = ClassifierSpec(arch="small_resnet", num_classes=3, in_channels=1, input_size=8,
                          widths=[4, 8, 8, 8], mean=[0.5], std=[0.25], classes=["a", "b", "c"])
    model = build_classifier(spec).eval()
    images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    return model, images


def test_head_faults_change_only_the_head(tiny) -> None:
    model, images = tiny
    logits, z = predict(model, images)
    swapped, fault = head_swap(model, 0, 2)
    s_logits, s_z = predict(swapped, images)
    assert fault.component == "head" and fault.pair == (0, 2)
    np.testing.assert_array_equal(s_z, z)
    np.testing.assert_allclose(s_logits, logits[:, [2, 1, 0]], atol=1e-5)
    np.testing.assert_allclose(predict(model, images)[0], logits)  # original untouched
    blended, _ = head_blend(model, 0, 1, alpha=0.5)
    b_logits = predict(blended, images)[0]
    np.testing.assert_allclose(b_logits[:, 0], b_logits[:, 1], atol=1e-5)
    shifted, fault = bias_shift(model, 1, 2.5)
    np.testing.assert_allclose(predict(shifted, images)[0] - logits, [[0, 2.5, 0]] * 64,
                               atol=1e-5)
    assert fault.target == 1


def test_encoder_faults_change_only_the_encoder(tiny) -> None:
    model, images = tiny
    ablated, fault = encoder_ablate(model, "layer4", 0.5, seed=0)
    z = predict(ablated, images)[1]
    assert fault.component == "encoder" and fault.params["channels"] == 4
    assert int((np.abs(z).max(0) == 0).sum()) >= 4  # the ablated feature channels are zero
    assert torch.equal(ablated.head.weight, model.head.weight)
    with pytest.raises(ValueError, match="downsample"):
        encoder_ablate(model, "layer1", 0.5)  # 4 -> 4 channels, stride 1: no projection
    x = torch.rand(60, 1, 8, 8)
    y = torch.arange(60) % 3
    merged, fault = encoder_merge(model, 0, 1, x, y, steps=5)
    assert fault.component == "encoder" and fault.pair == (0, 1)
    assert torch.equal(merged.head.weight, model.head.weight)
    assert not torch.equal(merged.encoder.conv1.weight, model.encoder.conv1.weight)


def test_erasing_a_pair_removes_its_linear_separation() -> None:
    """Two classes that differ in 3 of 10 dimensions, with unequal variances there: each
    erased direction leaves less separation (the squared Mahalanobis distance of the class
    means under the projected features' covariance), one is not enough, five leave none.
    The result is an orthogonal projection (symmetric, idempotent, rank 10 - dims)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 10))
    is_a = np.arange(2000) < 1000
    z[:, :3] *= [4.0, 1.0, 0.25]
    z[is_a, :3] += [3.0, -2.0, 1.5]

    def separation(p: np.ndarray) -> float:
        zp = z @ p
        gap = zp[is_a].mean(0) - zp[~is_a].mean(0)
        return float(gap @ np.linalg.lstsq(np.cov(zp.T) + 1e-3 * np.eye(10), gap,
                                           rcond=None)[0])

    seps = [separation(np.eye(10))]
    for dims in (1, 3, 5):
        p = erasing_projection(z, is_a, dims)
        np.testing.assert_allclose(p, p.T, atol=1e-9)  # entries of order 1, exact arithmetic
        np.testing.assert_allclose(p @ p, p, atol=1e-9)
        assert np.linalg.matrix_rank(p) == 10 - dims
        seps.append(separation(p))
    assert seps == sorted(seps, reverse=True), seps
    assert seps[1] > 1.0 and seps[3] < 0.01, seps  # before: about 3.7
    with pytest.raises(ValueError, match="dims"):
        erasing_projection(z, is_a, 10)


def test_encoder_erase_changes_only_the_encoders_features(tiny) -> None:
    model, images = tiny
    x = torch.rand(60, 1, 8, 8)
    y = torch.arange(60) % 3
    erased, fault = encoder_erase(model, 0, 1, x, y, dims=2)
    assert fault.component == "encoder" and fault.pair == (0, 1)
    assert torch.equal(erased.head.weight, model.head.weight)
    z0, z1 = predict(model, images)[1], predict(erased, images)[1]
    p = erased.encoder.projection.numpy()
    # float32 features (entries of order 1) times a float32 projection: ~1e-6 relative
    np.testing.assert_allclose(z1, z0 @ p, rtol=1e-4, atol=1e-5)
    assert np.linalg.matrix_rank(p.astype(np.float64), tol=1e-4) == z0.shape[1] - 2
    np.testing.assert_array_equal(predict(model, images)[1], z0)  # original untouched


def test_simulated_oracle_has_the_stated_accuracy() -> None:
    labels = np.random.default_rng(1).integers(0, 10, 20000)
    for p in (0.0, 0.5, 0.8, 1.0):
        oracle = simulated_oracle(labels, 10, p, seed=3)
        assert abs((oracle == labels).mean() - p) < 0.015
        assert ((oracle >= 0) & (oracle < 10)).all()


def test_localisation_accuracy_counts() -> None:
    res = localisation_accuracy(np.array(["head", "encoder", "ambiguous", "head"]), "head")
    assert res == {"head": 2, "encoder": 1, "ambiguous": 1, "n": 4, "accuracy": 0.5,
                   "decided_accuracy": 0.66667}


@pytest.mark.slow  # localises every error of two variants
def test_perfect_oracle_localises_head_swap_and_encoder_ablation(fashion_mnist_test) -> None:
    model, _, _ = load_classifier(DEMO_BANK / "classifier.safetensors")
    images, labels = fashion_mnist_test.images[:1600], fashion_mnist_test.labels[:1600]
    fit_images, fit_labels = images[:1000], labels[:1000]
    test_images, test_labels = images[1000:], labels[1000:]
    # a "VLM" whose image embedding is its class's prompt vector plus noise
    rng = np.random.default_rng(0)
    class_T = np.linalg.qr(rng.normal(size=(32, 10)))[0].T.astype(np.float32)  # (10, 32)
    v_fit = class_T[fit_labels] + 0.3 * rng.normal(size=(1000, 32)).astype(np.float32)
    pred0 = predict(model, test_images)[0].argmax(1)
    oracle = simulated_oracle(test_labels, 10, 1.0)
    results = {}
    a0 = fit_aligner(predict(model, fit_images)[1], v_fit)
    variants = {"head_swap": head_swap(model, 1, 8),
                "encoder_ablate": encoder_ablate(model, "layer4", 0.99)}
    results = {name: run_variant(variant, fault, fit_images, v_fit, test_images, test_labels,
                                 pred0, oracle, class_T, ps=(1.0,),
                                 original_aligner=(a0.W, a0.b))
               for name, (variant, fault) in variants.items()}
    swap, ablate = results["head_swap"], results["encoder_ablate"]
    assert swap["injected_errors"] >= 80  # trousers and bags of 600 test images
    assert swap["ambiguous"] == 0
    assert swap["accuracy"] >= 0.9, swap
    assert swap["original_aligner"]["accuracy"] >= 0.9  # the encoder did not change
    assert ablate["injected_errors"] >= 100
    assert ablate["accuracy"] >= 0.8, ablate  # one channel left: the class is gone
    assert ablate["original_aligner"]["accuracy"] >= 0.8
    assert ablate["simulated_oracle"]["1.0"]["accuracy"] == ablate["accuracy"]
    table = paper_rule_table(results)
    assert "| head_swap | head |" in table and "encoder_ablate" in table


def test_inject_faults_command_is_registered() -> None:
    from offline.cli import parser

    args = parser().parse_args(["inject-faults", "--bank", "banks/demo", "--dry-run"])
    assert args.dry_run and str(args.bank) == "banks/demo" and args.save_variants is None


def test_demo_bank_ships_fault_injection_figures() -> None:
    import json

    metrics = json.loads((DEMO_BANK / "report" / "metrics.json").read_text())
    fi = metrics["fault_injection"]
    s = fi["summary"]
    for key in ("changed_accuracy", "limit_agreement", "abstain_rate"):
        assert 0.0 <= s[key]["value"] <= 1.0 and len(s[key]["ci95"]) == 2
    assert set(s["by_kind"]) == set(SEVERITIES) and len(SEVERITIES) >= 7
    assert len(fi["variants"]) == 9 * len(SEVERITIES)  # 3 severities x 3 seeds
    for v in fi["variants"]:
        r = v["paper_rule"]["vlm"]
        assert r["head"] + r["encoder"] + r["ambiguous"] == v["injected_errors"]
        assert v["changed"] in {"head", "encoder", "both", "none"}


def test_new_fault_kinds_change_only_their_component(tiny) -> None:
    model, images = tiny
    logits, z = predict(model, images)
    scaled, fault = head_scale(model, 2, 1.5)
    s_logits, s_z = predict(scaled, images)
    np.testing.assert_array_equal(s_z, z)
    np.testing.assert_allclose(s_logits[:, 2], 1.5 * logits[:, 2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_logits[:, :2], logits[:, :2], rtol=1e-6, atol=1e-6)
    assert fault.component == "head" and fault.target == 2
    swapped, fault = head_swap(model, 0, 1, more=((1, 2),))
    np.testing.assert_allclose(predict(swapped, images)[0], logits[:, [1, 2, 0]], atol=1e-5)
    for make in (lambda: encoder_bn_drift(model, 1.0, seed=0),
                 lambda: encoder_noise(model, 0.2, seed=0)):
        faulty, fault = make()
        assert fault.component == "encoder"
        assert torch.equal(faulty.head.weight, model.head.weight)
        assert not np.allclose(predict(faulty, images)[1], z, atol=1e-3)
        again, _ = make()  # seeded: the same fault again
        np.testing.assert_array_equal(predict(again, images)[1], predict(faulty, images)[1])
    np.testing.assert_array_equal(predict(model, images)[1], z)  # original untouched


def test_fault_grid_covers_every_kind_severity_and_seed() -> None:
    grid = fault_grid(10)
    assert len(grid) == len(SEVERITIES) * 3 * 3 and len({g["name"] for g in grid}) == len(grid)
    swaps = [g for g in grid if g["kind"] == "head_swap"]
    assert {len(g["more"]) for g in swaps} == {0, 1, 2}
    assert all(g["a"] != g["b"] for g in grid if "b" in g)
    with pytest.raises(ValueError, match="unknown fault kind"):
        fault_grid(10, kinds=["nope"])


def test_summary_pools_verdicts_with_intervals() -> None:
    def variant(kind, component, changed, limits):
        pairs = [{"limit": lim, "repair": {"fixed": fixed, "recovered": rec},
                  "agrees": None if lim == "abstain" else fixed == (lim == "head")}
                 for lim, fixed, rec in limits]
        return {"kind": kind, "component": component, "changed": changed,
                "changed_right": None if changed == "none" else changed == component,
                "pairs": pairs, "paper_rule": {m: {"head": 1, "encoder": 0, "n": 2}
                                               for m in ("vlm", "perfect_oracle")}}
    vs = [variant("head_swap", "head", "head", [("head", True, 0.95)]),
          variant("head_swap", "head", "none", []),
          variant("encoder_merge", "encoder", "encoder", [("encoder", False, 0.1),
                                                          ("abstain", False, 0.2)]),
          variant("encoder_noise", "encoder", "head", [("head", False, 0.3)])]
    s = summarise(vs)
    assert s["changed_accuracy"]["value"] == round(2 / 3, 4)
    assert s["no_measurable_effect"] == 1
    assert s["limit_agreement"]["k"] == 2 and s["limit_agreement"]["n"] == 3
    assert s["abstain_rate"]["value"] == 0.25
    assert s["head_limit_recovered_90"]["k"] == 1 and s["head_limit_recovered_90"]["n"] == 2
    assert s["paper_rule_accuracy_vlm"]["value"] == round(2 / 8, 4)  # 1 head right of 2 each
    assert s["by_kind"]["head_swap"]["changed_accuracy"]["value"] == 1.0
    lo, hi = wilson(9, 10)
    assert lo < 0.9 < hi and 0.55 < lo < 0.6
    assert wilson(0, 0) is None
    assert "| all |" in summary_table({"summary": s})
