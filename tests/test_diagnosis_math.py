"""The pure parts of diagnose: swap attribution, pair geometry and the limit verdict, the
head-only repair, and the concept check (competence, faithfulness, plausibility), on
synthetic features whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from conceptguard.concept_check import (
    competence,
    concepts_unavailable,
    faithfulness,
    pair_concepts,
    plausibility,
    remove_directions,
)
from conceptguard.diagnosis import (
    PROBE_L2,
    agrees,
    changed_verdict,
    confused_pairs,
    features_whitening,
    fix_shares,
    fixed_errors,
    head_logits,
    limit_verdict,
    pair_geometry,
    pair_probe,
    parameter_shift,
    repair_outcome,
    swap_predictions,
    swap_shares,
    tuned_pair_probe,
)
from conceptguard.repair import fit_class_head


def gaussian_classes(n_per: int, means: np.ndarray, seed: int = 0, noise: float = 1.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(means)), n_per)
    z = means[y] + noise * rng.normal(size=(len(y), means.shape[1]))
    return z.astype(np.float32), y


@pytest.fixture(scope="module")
def three_classes():
    """Three well-separated classes in 6 dimensions and the head fitted on them."""
    means = np.zeros((3, 6))
    means[0, 0], means[1, 1], means[2, 2] = 4.0, 4.0, 4.0
    z, y = gaussian_classes(300, means, seed=0)
    zt, yt = gaussian_classes(300, means, seed=1)
    W, b = fit_class_head(z, y, 3)
    return z, y, zt, yt, (W, b)


def test_fit_head_separates_and_balances_classes(three_classes) -> None:
    z, y, zt, yt, (W, b) = three_classes
    assert (head_logits(zt, W, b).argmax(1) == yt).mean() > 0.97
    # 20x imbalance: class-balanced weights keep the rare class's recall
    keep = np.concatenate([np.flatnonzero(y != 2), np.flatnonzero(y == 2)[:15]])
    Wi, bi = fit_class_head(z[keep], y[keep], 3)
    pred = head_logits(zt, Wi, bi).argmax(1)
    assert (pred[yt == 2] == 2).mean() > 0.9
    with pytest.raises(ValueError, match="every class"):
        fit_class_head(z[y != 1], y[y != 1], 3)


def test_swapping_components_attributes_new_errors(three_classes) -> None:
    _, _, zt, yt, (W, b) = three_classes
    # head fault: rows 0 and 1 swapped; the encoder (features) unchanged
    Ws, bs = W[[1, 0, 2]], b[[1, 0, 2]]
    p = swap_predictions(zt, zt, (W, b), (Ws, bs))
    shares = swap_shares(yt, p, np.ones(len(yt), bool))
    assert shares["new_errors"] > 400
    assert shares["head_share"] == 1.0 and shares["encoder_share"] == 0.0
    assert changed_verdict(shares) == "head"
    # encoder fault: class 0's features moved onto class 1's; the head unchanged
    z_bad = zt.copy()
    z_bad[yt == 0] += np.array([-4.0, 4.0, 0, 0, 0, 0], np.float32)
    p = swap_predictions(zt, z_bad, (W, b), (W, b))
    shares = swap_shares(yt, p, yt == 0)
    assert shares["new_errors"] > 250 and changed_verdict(shares) == "encoder"
    assert parameter_shift(zt, z_bad, (W, b), (W, b))["head_shift"] == 0.0
    # nothing changed: no new errors
    p = swap_predictions(zt, zt, (W, b), (W, b))
    assert changed_verdict(swap_shares(yt, p, np.ones(len(yt), bool))) == "none"
    # both changed, each alone harmless: only the combination errs -> both
    assert changed_verdict({"new_errors": 10, "encoder_share": 0.1, "head_share": 0.2}) == \
        "both"


def test_fixed_errors_are_attributed_as_new_ones(three_classes) -> None:
    """The reverse change: a broken head (rows 0 and 1 swapped) as the reference and the
    good head as the candidate. The candidate fixes the errors the swap made (and makes a
    few new ones); the head's swap alone fixes them all, the encoder's none."""
    _, _, zt, yt, (W, b) = three_classes
    Ws, bs = W[[1, 0, 2]], b[[1, 0, 2]]
    p = swap_predictions(zt, zt, (Ws, bs), (W, b))
    everything = np.ones(len(yt), bool)
    assert int(fixed_errors(yt, p).sum()) > 400
    # the few new errors: inputs the good head misreads as class 0 or 1 that the swap
    # happened to turn right; far below the fixed ones
    assert swap_shares(yt, p, everything)["new_errors"] < 0.05 * int(fixed_errors(yt, p).sum())
    fixes = fix_shares(yt, p, everything)
    assert fixes["new_errors"] == int(fixed_errors(yt, p).sum())
    assert fixes["head_share"] == 1.0 and fixes["encoder_share"] == 0.0
    assert changed_verdict(fixes) == "head"
    # no change: nothing fixed
    same = swap_predictions(zt, zt, (W, b), (W, b))
    assert fix_shares(yt, same, everything)["new_errors"] == 0


def test_limit_head_when_the_probe_beats_the_head(three_classes) -> None:
    z, y, _, _, (W, b) = three_classes
    good = pair_geometry(z, y, 0, 1, W, b, whiten=np.eye(6), seed=0)
    assert good["probe_accuracy"] > 0.97 and good["head_accuracy"] > 0.97
    assert limit_verdict(good) == "encoder"  # nothing for a retrained head to win
    assert good["mahalanobis"] > 4.5 and good["angle_deg"] < 30
    # a head that reads the pair along a useless direction: probe >> head
    Wbad = W.copy()
    Wbad[0], Wbad[1] = W[0] + 3 * W[1], W[1] + 3 * W[0]
    bad = pair_geometry(z, y, 0, 1, Wbad, b, seed=0)
    assert bad["probe_accuracy"] - bad["head_accuracy"] > 0.2
    assert limit_verdict(bad) == "head"
    # a shifted bias: the boundary sits off the middle of the pair
    shifted = b.copy()
    shifted[0] += 8.0
    off = pair_geometry(z, y, 0, 1, W, shifted, seed=0)
    assert off["bias_offset"] > 1.0 and limit_verdict(off) == "head"


def test_limit_encoder_when_the_pair_overlaps() -> None:
    means = np.zeros((2, 6))
    means[0, 0] = 0.6  # classes barely apart: no linear rule reads them well
    z, y = gaussian_classes(400, means, seed=3)
    W, b = fit_class_head(z, y, 2)
    g = pair_geometry(z, y, 0, 1, W, b, seed=0)
    assert g["probe_accuracy"] < 0.75 and abs(g["gap"]) < 0.02
    assert limit_verdict(g) == "encoder"
    with pytest.raises(ValueError, match="at least 2"):
        pair_geometry(z[:401], y[:401], 0, 1, W, b)
    two = pair_geometry(z[:402], y[:402], 0, 1, W, b)  # 2 rows of class 1: no inner split
    assert two["n"] == 402 and two["probe_l2"] == min(PROBE_L2)


def test_pairs_outcomes_and_agreement() -> None:
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    p = np.array([1, 1, 0, 0, 1, 1, 1, 2])
    assert confused_pairs(y, p) == [(0, 1, 2), (2, 1, 2), (1, 0, 1)]
    assert confused_pairs(y, p, min_errors=2, top=1) == [(0, 1, 2)]
    # errors between the pair's two classes: 60 with the fault, 2 with the reference
    fixed = repair_outcome(before=60, after=5, floor=2)
    assert fixed["fixed"] and fixed["recovered"] == round(55 / 58, 4)
    assert agrees("head", fixed) and not agrees("encoder", fixed)
    assert agrees("abstain", fixed) is None
    unfixed = repair_outcome(before=40, after=39, floor=None)  # lost = every error
    assert unfixed["fixed"] is False and agrees("encoder", unfixed)
    assert repair_outcome(30, 30, floor=35)["fixed"] is None  # nothing was lost
    # 3 lost errors cannot be measured: a recovery of 11x or -3x would be noise
    assert repair_outcome(12, 1, floor=9)["recovered"] is None
    assert repair_outcome(14, 1, floor=9)["recovered"] == 2.6  # 5 lost: measured


def test_changed_both_when_each_component_carries_a_share() -> None:
    """An unchanged component's swap gives the reference back (share 0), so a sizeable
    share on each side means both moved: two faults at once are not hidden behind the
    larger one."""
    assert changed_verdict({"new_errors": 1543, "encoder_share": 0.54, "head_share": 0.45}) \
        == "both"
    assert changed_verdict({"new_errors": 900, "encoder_share": 0.87, "head_share": 0.13}) \
        == "encoder"
    assert changed_verdict({"new_errors": 900, "encoder_share": 0.0, "head_share": 1.0}) \
        == "head"


def test_tuned_probe_picks_its_penalty_and_reads_more_of_a_weak_signal() -> None:
    """Few rows in many dimensions, the signal spread thinly over all of them: the lightly
    penalised probe overfits, the nested choice of penalty does not (and stays honest)."""
    n, d = 120, 200
    is_a = np.arange(n) < n // 2
    gains = []
    for seed in (7, 8, 9):
        x = np.random.default_rng(seed).normal(size=(n, d)) + np.where(is_a[:, None], 0.1,
                                                                         -0.1)
        tuned = tuned_pair_probe(x, is_a, seed=0)
        assert tuned.l2 in PROBE_L2 and tuned.hits.shape == (n,)
        assert tuned.accuracy == 0.5 * (tuned.hits[is_a].mean() + tuned.hits[~is_a].mean())
        gains.append(tuned.accuracy - pair_probe(x, is_a, seed=0)[0])
    assert min(gains) >= 0 and np.mean(gains) >= 0.02, gains


def test_limit_against_a_reference(three_classes) -> None:
    """A head fault on unchanged features: the reference's head does better on the very
    same features, so the head limits the pair even where the probe alone cannot tell.
    An encoder that lost the pair's separation, with a head that reads what is left:
    encoder. Neither shown: abstain, never a guess."""
    z, y, _, _, (W, b) = three_classes
    bent = b.copy()
    bent[0] += 2.5  # a mild bias fault: the boundary moved a little
    alone = pair_geometry(z, y, 0, 1, W, bent, seed=0)
    assert alone["gap"] < 0.03 and limit_verdict(alone) != "head"  # too small for the probe
    g = pair_geometry(z, y, 0, 1, W, bent, seed=0, reference_head=(W, b), reference_z=z)
    assert g["separation_loss"] == 0.0 and g["reference_head_gap"] > 0
    assert limit_verdict(g) == "head"
    # the encoder blurred the pair: class 0 moved halfway onto class 1, head refitted
    blurred = z.copy()
    blurred[y == 0] = 0.5 * z[y == 0] + 0.5 * z[y == 1][: int((y == 0).sum())]
    Wb, bb = fit_class_head(blurred, y, 3)
    g = pair_geometry(blurred, y, 0, 1, Wb, bb, seed=0, reference_head=(W, b),
                      reference_z=z)
    assert g["separation_loss"] > 0.02 and limit_verdict(g) == "encoder"
    # the same evidence without the separation loss: the encoder is not shown to be it
    g = pair_geometry(blurred, y, 0, 1, Wb, bb, seed=0, reference_head=(Wb, bb),
                      reference_z=blurred)
    assert limit_verdict(g) == "abstain"


def test_competence_names_concepts_only_where_both_views_separate() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 200)
    s = rng.normal(size=(600, 5))
    o = rng.normal(size=(600, 5))
    s[y == 0, 0] += 3.0  # concept 0 marks class 0 in both views
    o[y == 0, 0] += 3.0
    s[y == 1, 1] += 3.0  # concept 1 marks class 1 in the model view only
    comp = competence(o, s, y, ["a", "b", "c"], threshold=0.8, folds=3)
    assert comp["pairs"]["a|b"]["competent"] and comp["pairs"]["a|c"]["competent"]
    assert not comp["pairs"]["b|c"]["competent"]  # the VLM view cannot tell b from c
    assert comp["classes"]["a"]["competent"] and not comp["classes"]["c"]["competent"]
    assert concepts_unavailable(comp, "a") is None
    why = concepts_unavailable(comp, "c")
    assert why is not None and "c" in why and "0.80" in why
    assert "no concept competence check" in concepts_unavailable(None, "a")
    named = pair_concepts(o, s, y, 0, 2, ["k0", "k1", "k2", "k3", "k4"], k=1)
    assert named[0]["concept"] == "k0" and named[0]["favours"] == "a"


def test_faithfulness_and_plausibility() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(300, 8))
    dirs = np.eye(8)  # concept k reads feature k
    w = np.zeros(8)
    w[0], w[1] = 2.0, 0.1  # the score rests on concept 0
    f = faithfulness(z, w, dirs, [0], z.mean(0), draws=10, boot=50)
    assert f["ratio"] > 10 and f["ratio_ci95"][0] > 5
    none = faithfulness(z, w, dirs, [5], z.mean(0), draws=10, boot=50)
    assert none["named_change"] == 0.0 and none["ratio"] < 0.1
    cut = remove_directions(z, dirs[[0, 1]], np.zeros(8))
    assert np.abs(cut[:, :2]).max() < 1e-9
    np.testing.assert_allclose(cut[:, 2:], z[:, 2:], rtol=1e-12)
    p = plausibility(["collar", "sole"], {"collar", "buttons"}, ["collar", "sole", "buttons",
                                                                  "hood"])
    assert p == {"hits": 1, "named": 2, "chance": 0.5}


@pytest.mark.parametrize(("probe", "loss", "verdict"), [
    (0.665, 0.271, "encoder"),  # the probe's lead is 38% of what the pair lost
    (0.844, 0.150, "head"),  # 69%: a new head wins most of it back
    (0.700, 0.200, "abstain"),  # 50%: the repair's own threshold, too close to call
])
def test_a_broken_head_on_an_encoder_that_lost_the_pair(
        probe: float, loss: float, verdict: str) -> None:
    """Probe far above the head, and the separation lost too: a retrained head wins back
    the probe's lead, not what the encoder lost; its share of the pair's loss decides
    (measured: an erased pair's repair won back 21% of it, a 1,000-step merge's 62%)."""
    g = {"probe_accuracy": probe, "head_accuracy": 0.5, "gap_se": 0.015,
         "separation_loss": loss, "separation_loss_se": 0.015,
         "reference_head_gap": 0.0, "reference_head_gap_se": 0.0}
    assert limit_verdict(g) == verdict


def test_reference_probes_are_fitted_once_and_change_nothing(three_classes) -> None:
    """Many candidates against one reference: each pair's reference probe is kept in the
    caller's dict and reused, with the same evidence as a fresh fit; features identical to
    the reference's reuse the candidate's own probe."""
    z, y, _, _, (W, b) = three_classes
    moved = z * 1.1
    fresh = pair_geometry(moved, y, 0, 1, W, b, seed=0, reference_head=(W, b), reference_z=z)
    cache: dict = {}
    first = pair_geometry(moved, y, 0, 1, W, b, seed=0, reference_head=(W, b), reference_z=z,
                          reference_probes=cache)
    assert list(cache) == [(0, 1, 5, 0)] and first == fresh
    again = pair_geometry(moved, y, 0, 1, W, b, seed=0, reference_head=(W, b), reference_z=z,
                          reference_probes=cache)
    assert again == fresh and len(cache) == 1
    same = pair_geometry(z, y, 0, 1, W, b, seed=0, reference_head=(W, b), reference_z=z)
    assert same["separation_loss"] == 0.0 and same["separation_loss_se"] == 0.0


def test_a_candidates_mahalanobis_is_measured_in_its_own_units(three_classes) -> None:
    """An encoder that only rescales its features keeps every pair's separation: with the
    whitening of its own features the Mahalanobis distance is unchanged, while the bank's
    whitening (fitted on the unscaled features) would report it ten times larger."""
    z, y, _, _, (W, b) = three_classes
    own = features_whitening(z, y, 3)
    base = pair_geometry(z, y, 0, 1, W, b, whiten=own)["mahalanobis"]
    scaled = z * 10.0
    rescaled = pair_geometry(scaled, y, 0, 1, W / 10.0, b,
                             whiten=features_whitening(scaled, y, 3))["mahalanobis"]
    # the whitening is stored in float32 (relative rounding 6e-8 per entry, summed over 6
    # dimensions) and the distance is rounded to 4 decimals: both far inside 1e-3
    assert rescaled == pytest.approx(base, abs=1e-3)
    wrong = pair_geometry(scaled, y, 0, 1, W / 10.0, b, whiten=own)["mahalanobis"]
    assert wrong > 9 * base
