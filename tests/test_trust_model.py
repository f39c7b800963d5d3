"""The trust model on a synthetic stream where the truth is known: softmax confidence
decides on familiar inputs, distance decides far from the reference data."""

from __future__ import annotations

import numpy as np

from conceptguard.calibration import (
    Batch,
    CalibrationSpec,
    fit_trust_model,
    fold_of,
    out_of_fold_trust,
)
from conceptguard.detectors import DETECTORS
from conceptguard.metrics import auroc
from conceptguard.scoring import REASON_KINDS, evaluate_trust, reasons
from conceptguard.trust import HEADS, design, feature_names


def _risks(rng: np.random.Generator, n: int, conf: np.ndarray, dist: np.ndarray) -> dict:
    """Synthetic detector risks: confidence detectors follow ``conf`` (the chance of being
    right), density ones follow ``dist``; the concept ones are noise."""
    r = {}
    for name, cls in DETECTORS.items():
        if cls.group == "confidence":
            r[name] = -conf if name == "msp" else -np.log(conf / (1 - conf) + 1e-9)
            if name in ("entropy", "doctor"):
                r[name] = (1 - conf) + 1e-3
        elif cls.group == "density" and name != "vim" and name != "react_energy":
            r[name] = dist + 0.05 * rng.random(n)
        else:
            r[name] = 0.1 * rng.normal(size=n)
    return r


def _stream(seed: int = 0) -> tuple[Batch, dict]:
    rng = np.random.default_rng(seed)
    groups, fams, conf, dist, wrong = [], [], [], [], []
    for group, fam, n, dist_mu in (("clean", "clean", 3000, 1.0), ("corruption", "blur", 600, 1.3),
                                   ("attack", "pgd", 400, 3.0), ("foreign", "noise", 400, 4.0)):
        c = rng.uniform(0.35, 1.0, n)
        w = rng.random(n) > c if group in ("clean", "corruption") else np.ones(n, bool)
        if group == "attack":
            c = rng.uniform(0.9, 1.0, n)  # confident and wrong: softmax cannot see it
        groups += [group] * n
        fams += [fam] * n
        conf.append(c)
        dist.append(rng.normal(dist_mu, 0.3, n).clip(0.05))
        wrong.append(w)
    conf_a, dist_a, wrong_a = map(np.concatenate, (conf, dist, wrong))
    n = len(conf_a)
    labels = np.where(wrong_a, 1, 0)
    logits = np.zeros((n, 2), np.float32)  # predictions are all class 0
    b = Batch(logits, np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32), labels,
              np.array(groups, dtype=object), np.array(fams, dtype=object))
    return b, _risks(rng, n, conf_a, dist_a)


def test_trust_keeps_softmax_ranking_on_clean_and_uses_distance_on_attacks() -> None:
    stream, risks = _stream()
    clean_ref = {k: v[stream.group == "clean"] for k, v in risks.items()}
    from conceptguard.trust import hinge_knots

    knots = hinge_knots(clean_ref)
    x = design(risks, knots)
    assert x.shape[1] == len(feature_names())
    spec = CalibrationSpec()
    model = fit_trust_model(x, stream, knots, spec)
    assert set(model.heads) == set(HEADS)
    res = evaluate_trust(model, risks, threshold=0.5)
    clean = stream.group == "clean"
    msp_auc = auroc(risks["msp"][clean], stream.wrong[clean])
    assert auroc(1 - res.trust[clean], stream.wrong[clean]) > msp_auc - 0.01
    attack = stream.group == "attack"
    neg = clean & ~stream.wrong
    pos_neg = np.r_[np.ones(attack.sum(), bool), np.zeros(neg.sum(), bool)]
    assert auroc(np.r_[1 - res.trust[attack], 1 - res.trust[neg]], pos_neg) > 0.95
    assert auroc(np.r_[risks["msp"][attack], risks["msp"][neg]], pos_neg) < 0.6
    # the kind heads name the defects
    assert np.mean([r == "adversarial-like" for r, a in zip(res.reason, attack, strict=True)
                    if a]) > 0.7
    assert all(r in REASON_KINDS for r in res.reason)


def test_out_of_fold_trust_uses_folds_by_source_image() -> None:
    stream, risks = _stream(1)
    src = np.arange(len(stream)) % 500  # variants of 500 source images
    folds = fold_of(src, 5, seed=0)
    for s in range(500):
        assert len(set(folds[src == s])) == 1
    from conceptguard.trust import hinge_knots

    knots = hinge_knots(risks)
    x = design(risks, knots)
    oof = out_of_fold_trust(x, stream, knots, CalibrationSpec(folds=3), risks, seed=0)
    assert oof.shape == (len(stream),) and np.all((oof >= 0) & (oof <= 1))


def test_reason_is_named_by_the_head_carrying_the_evidence() -> None:
    reject = np.array([False, True, True, True, True, True])
    p_mis = np.array([0.9, 0.6, 0.1, 0.2, 0.5, 0.1])
    p_anom = np.array([0.9, 0.3, 0.8, 0.7, 0.5, 0.9])
    p_adv = np.array([0.9, 0.9, 0.9, 0.3, 0.9, 0.7])
    p_unf = np.array([0.9, 0.1, 0.2, 0.6, 0.1, 0.7])
    r = reasons(reject, p_mis, p_anom, p_adv, p_unf)
    assert r == ["accepted", "misclassification-like", "adversarial-like", "unfamiliar",
                 "misclassification-like", "adversarial-like"]
