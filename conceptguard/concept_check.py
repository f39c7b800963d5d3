"""Where concepts may be named: a measured competence check, and what named concepts are worth.

The VLM names concepts through two maps, its own image encoder (the VLM view ``o``) and the
aligner from the classifier's features (the model view ``s``). A class pair ``(a, b)`` is
*competent* when both views' concept profiles separate ``a`` from ``b`` (a cross-validated
linear probe on the standardised concept scores reaches ``threshold``); a class is competent
when both views separate it from the rest. Elsewhere nothing is named: the concepts would be
noise (:func:`competence`).

For a competent pair the named concepts are those whose model-view scores differ most between
the two classes and whose VLM-view scores differ the same way (:func:`pair_concepts`).
They are then measured:

- **faithfulness** (:func:`faithfulness`): removing the named concepts' directions from the
  features (the feature-space directions ``W t_k`` that the aligner reads them along) moves
  the pair's logit margin more than removing as many random concepts' directions, paired per
  input, with a bootstrap interval of the ratio;
- **plausibility** (:func:`plausibility`): the share of named concepts that a class-to-concept
  table lists for one of the pair's classes, against the share random concepts reach.
"""

from __future__ import annotations

import numpy as np

from conceptguard.diagnosis import pair_probe  # numpy only at import (the service uses this)


def _balanced_ovr(x: np.ndarray, labels: np.ndarray, c: int, folds: int, seed: int,
                  max_rest: int = 2000) -> float:
    """One-vs-rest probe accuracy of class ``c`` (the rest subsampled to ``max_rest``)."""
    rng = np.random.default_rng(seed + c)
    own = np.flatnonzero(labels == c)
    rest = np.flatnonzero(labels != c)
    if len(rest) > max_rest:
        rest = np.sort(rng.choice(rest, max_rest, replace=False))
    rows = np.concatenate([own, rest])
    return pair_probe(x[rows], labels[rows] == c, folds, seed)[0]


def competence(o: np.ndarray, s: np.ndarray, labels: np.ndarray, classes: list[str],
               threshold: float = 0.8, folds: int = 5, seed: int = 0) -> dict:
    """Per class and per unordered class pair: the probe accuracy of the VLM view ``o`` and
    of the model view ``s`` (both ``(N, K)`` concept scores of the same inputs), and whether
    both reach ``threshold``. Pairs are keyed ``"a|b"`` in class order."""
    n = len(classes)
    out: dict = {"threshold": threshold, "folds": folds, "n": int(len(labels)),
                 "method": "cross-validated logistic probe on standardised concept scores, "
                           "VLM view (the VLM's image embedding) and model view (the "
                           "aligner on the classifier's features); competent: both reach "
                           "the threshold",
                 "classes": {}, "pairs": {}}
    for c in range(n):
        if (labels == c).sum() < 2:
            continue
        v, m = (_balanced_ovr(x, labels, c, folds, seed) for x in (o, s))
        out["classes"][classes[c]] = {"vlm_accuracy": round(v, 4), "model_accuracy": round(m, 4),
                                      "competent": bool(min(v, m) >= threshold)}
    for a in range(n):
        for b in range(a + 1, n):
            rows = (labels == a) | (labels == b)
            is_a = labels[rows] == a
            if is_a.sum() < 2 or (~is_a).sum() < 2:
                continue
            v = pair_probe(o[rows], is_a, folds, seed)[0]
            m = pair_probe(s[rows], is_a, folds, seed)[0]
            out["pairs"][f"{classes[a]}|{classes[b]}"] = {
                "vlm_accuracy": round(v, 4), "model_accuracy": round(m, 4),
                "competent": bool(min(v, m) >= threshold)}
    return out


def _effect_sizes(x: np.ndarray, is_a: np.ndarray) -> np.ndarray:
    xa, xb = x[is_a], x[~is_a]
    pooled = np.sqrt(0.5 * (xa.var(0) + xb.var(0))) + 1e-9
    return (xa.mean(0) - xb.mean(0)) / pooled


def pair_concepts(o: np.ndarray, s: np.ndarray, labels: np.ndarray, a: int, b: int,
                  names: list[str], k: int = 3) -> list[dict]:
    """The ``k`` concepts that separate ``a`` from ``b`` most in the model view and the
    same way in the VLM view: ``{"concept", "favours", "effect"}`` (``favours``: the class
    with the higher score; ``effect``: the model view's standardised mean difference)."""
    rows = (labels == a) | (labels == b)
    is_a = labels[rows] == a
    em, ev = _effect_sizes(s[rows], is_a), _effect_sizes(o[rows], is_a)
    agree = np.sign(em) == np.sign(ev)
    order = [i for i in np.argsort(-np.abs(em)) if agree[i]][:k]
    return [{"concept": names[i], "favours": "a" if em[i] > 0 else "b",
             "effect": round(float(em[i]), 3)} for i in order]


def concept_directions(W: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Feature-space directions ``(K, d)`` the aligner reads the concepts along: the model
    view's raw score of concept ``k`` is ``(z W + b) . t_k``, so ``z``'s part along
    ``W t_k`` is what carries it."""
    return (np.asarray(W, np.float64) @ np.asarray(T, np.float64).T).T


def remove_directions(z: np.ndarray, directions: np.ndarray, centre: np.ndarray
                      ) -> np.ndarray:
    """``z`` with its component (about ``centre``) in the span of ``directions`` removed."""
    q, _ = np.linalg.qr(np.asarray(directions, np.float64).T)
    zc = np.asarray(z, np.float64) - centre
    return zc - (zc @ q) @ q.T + centre


def faithfulness(z: np.ndarray, margin_w: np.ndarray, directions: np.ndarray,
                 named: list[int], centre: np.ndarray, draws: int = 20, boot: int = 200,
                 seed: int = 0) -> dict:
    """How much removing the ``named`` concepts' directions moves the linear score
    ``z . margin_w`` (e.g. ``logit_a - logit_b``), against removing as many random other
    concepts' directions (``draws`` draws, averaged per input): the mean absolute changes,
    their ratio and its bootstrap 95% interval over inputs (paired)."""
    rng = np.random.default_rng(seed)
    w = np.asarray(margin_w, np.float64)
    base = np.asarray(z, np.float64) @ w
    named_change = np.abs(remove_directions(z, directions[named], centre) @ w - base)
    others = [i for i in range(len(directions)) if i not in named]
    rand = np.zeros(len(z))
    for _ in range(draws):
        pick = rng.choice(others, len(named), replace=False)
        rand += np.abs(remove_directions(z, directions[pick], centre) @ w - base)
    rand /= draws
    ratios = []
    for _ in range(boot):
        i = rng.integers(0, len(z), len(z))
        ratios.append(named_change[i].mean() / max(rand[i].mean(), 1e-12))
    return {"named_change": round(float(named_change.mean()), 4),
            "random_change": round(float(rand.mean()), 4),
            "ratio": round(float(named_change.mean() / max(rand.mean(), 1e-12)), 3),
            "ratio_ci95": [round(float(np.percentile(ratios, 2.5)), 3),
                           round(float(np.percentile(ratios, 97.5)), 3)],
            "n": int(len(z))}


def plausibility(named: list[str], expected: set[str], all_names: list[str]) -> dict:
    """The share of ``named`` concepts in ``expected`` (the table's concepts of the classes
    involved), and the share a random concept reaches (``chance``)."""
    hits = sum(c in expected for c in named)
    return {"hits": int(hits), "named": len(named),
            "chance": round(len(expected & set(all_names)) / max(len(all_names), 1), 4)}


def concepts_unavailable(comp: dict | None, class_name: str) -> str | None:
    """Why concepts may not be named for a prediction of ``class_name`` under the bank's
    check ``comp`` (the manifest's ``concept_competence``), or None where they may."""
    if comp is None:
        return "this bank has no concept competence check (conceptguard check-concepts)"
    entry = comp.get("classes", {}).get(class_name)
    if entry is None:
        return f"the competence check did not measure {class_name}"
    if entry["competent"]:
        return None
    return (f"concepts unavailable for {class_name}: the VLM's concept profiles separate it "
            f"from the other classes with probe accuracy {entry['vlm_accuracy']:.2f}, the "
            f"aligned ones with {entry['model_accuracy']:.2f} (needed: "
            f"{comp['threshold']:.2f})")
