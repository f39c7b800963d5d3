"""check-concepts: measure where the VLM and the aligner are competent, store it in the bank.

Build-bank runs the same check as its ``concept_check`` stage (:func:`concept_check` on the
arrays a build already holds); ``conceptguard check-concepts BANK`` adds it to a bank built
without it, from the data the config names and the cache, without a rebuild: only the
manifest (``concept_competence``) and ``report/metrics.json`` (``concepts``) change.

Competence and the named concepts come from the reference split; faithfulness is measured on
the calibration split, which chose nothing here. (The math: ``conceptguard.concept_check``.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conceptguard import bank as bankio
from conceptguard.concept_check import (
    competence,
    concept_directions,
    faithfulness,
    pair_concepts,
    plausibility,
)
from conceptguard.concepts import ConceptSet, load_concept_set
from conceptguard.data import load_source, make_splits
from conceptguard.projection import project_features
from conceptguard.repair import head_weights
from conceptguard.threads import single_threaded_blas
from offline.build_context import Context, torch_features, vlm_embeddings
from offline.cache import ArrayCache
from offline.config import JobConfig

THRESHOLD = 0.8
TOP_K = 3


def concept_check(o_ref: np.ndarray, s_ref: np.ndarray, y_ref: np.ndarray,
                  z_held: np.ndarray, y_held: np.ndarray, head: tuple[np.ndarray, np.ndarray],
                  W_align: np.ndarray, T: np.ndarray, classes: list[str], cs: ConceptSet,
                  threshold: float = THRESHOLD, seed: int = 0) -> tuple[dict, dict]:
    """``(competence, metrics)``: the check (with the named concepts of each competent pair)
    for the manifest, and its faithfulness and plausibility for metrics.json.
    ``o_ref``/``s_ref``: VLM- and model-view standardised concept scores of the reference
    split; ``z_held``/``y_held``: features and labels of a held-out split."""
    names = cs.names
    comp = competence(o_ref, s_ref, y_ref, classes, threshold, seed=seed)
    dirs = concept_directions(W_align, T)
    centre = z_held.mean(0)
    W, _ = head
    named_all, rand_all, pairs, hits, n_named, chances = [], [], {}, 0, 0, []
    index = {c: i for i, c in enumerate(classes)}
    for key, entry in comp["pairs"].items():
        if not entry["competent"]:
            continue
        a, b = (index[c] for c in key.split("|"))
        chosen = pair_concepts(o_ref, s_ref, y_ref, a, b, names, TOP_K)
        for c in chosen:
            c["favours"] = classes[a] if c["favours"] == "a" else classes[b]
        entry["concepts"] = chosen
        rows = (y_held == a) | (y_held == b)
        if not chosen or rows.sum() < 2:
            continue
        idx = [names.index(c["concept"]) for c in chosen]
        f = faithfulness(z_held[rows], W[a] - W[b], dirs, idx, centre, seed=seed)
        named_all.append(f["named_change"] * f["n"])
        rand_all.append(f["random_change"] * f["n"])
        expected = set(cs.class_concepts.get(classes[a], [])) | \
            set(cs.class_concepts.get(classes[b], []))
        p = plausibility([c["concept"] for c in chosen], expected, names) \
            if cs.class_concepts else None
        if p is not None:
            hits += p["hits"]
            n_named += p["named"]
            chances.append(p["chance"])
        pairs[key] = {"concepts": [c["concept"] for c in chosen], "faithfulness": f,
                      "plausibility": p}
    competent = [k for k, e in comp["pairs"].items() if e["competent"]]
    metrics = {
        "threshold": threshold,
        "competent_pairs": len(competent), "pairs": len(comp["pairs"]),
        "competent_classes": [c for c, e in comp["classes"].items() if e["competent"]],
        # None without a random baseline that moved the margin at all (degenerate features)
        "faithfulness_ratio": (round(sum(named_all) / sum(rand_all), 3)
                               if rand_all and sum(rand_all) > 0 else None),
        "plausibility": round(hits / n_named, 4) if n_named else None,
        "plausibility_chance": round(float(np.mean(chances)), 4) if chances else None,
        "per_pair": pairs,
        "note": ("Competence: reference split. Faithfulness: on calibration-split inputs of "
                 "each competent pair, the mean |change| of the head's logit margin "
                 "(w_a - w_b) when the named concepts' feature-space directions are removed, "
                 "over the same for as many random concepts (20 draws); ratio_ci95: "
                 "bootstrap over inputs. Plausibility: share of named concepts that the "
                 "concept set's class_concepts table lists for either class of the pair; "
                 "chance: the share for a random concept."),
    }
    return comp, metrics


def vlm_differences(stored: dict | None, mine: dict) -> list[str]:
    """The VLM settings that change its embeddings (all but ``batch_size`` and ``device``)
    in which ``mine`` differs from the bank's ``stored`` spec (none when the bank has none)."""
    if stored is None:
        return []
    return sorted(k for k in set(stored) | set(mine)
                  if k not in ("batch_size", "device") and stored.get(k) != mine.get(k))


def check_concepts(cfg: JobConfig, bank_dir: Path, *, threshold: float = THRESHOLD,
                   progress: bool = True) -> dict:
    """Run :func:`concept_check` for an existing bank and store it (manifest + metrics)."""
    ctx = Context(cfg, ArrayCache(cfg.cache_dir), progress)
    single_threaded_blas()  # many small fits: BLAS threads only spin-wait on busy cores
    bank = bankio.load_bank(bank_dir)
    m = bank.manifest
    cs = load_concept_set(cfg.concepts)
    if cs.names != m.concept_names:
        raise ValueError(f"the config's concept set {cs.name!r} is not the bank's "
                         f"({m.concept_set!r}, {len(m.concept_names)} concepts)")
    differ = vlm_differences(m.vlm.get("spec"), cfg.vlm.model_dump())
    if differ:
        raise ValueError(f"the config's VLM is not the bank's (it differs in {differ}); use "
                         f"the config the bank was built with")
    from conceptguard.classifier.io import load_classifier

    model, _, chash = load_classifier(bank.classifier_path)
    with ctx.stage("data"):
        train, test = load_source(cfg.data)
        if list(train.classes) != list(m.classes):
            raise ValueError(f"the config's dataset has classes {train.classes}, the bank "
                             f"{m.classes}")
        splits = make_splits(len(train), len(test), cfg.splits)
        if splits.digest() != m.data.get("splits_digest"):
            raise ValueError("the config's splits are not the bank's (splits digest differs); "
                             "use the config the bank was built with")
        ref, cal = train.subset(splits.reference), train.subset(splits.calibration)
        key = f"{cfg.data.cache_key()}|{splits.digest()}"
    with ctx.stage("features"):
        z_ref = torch_features(ctx, bank.classifier_path, chash, ref.images, "reference", key)
        z_cal = torch_features(ctx, bank.classifier_path, chash, cal.images, "calibration",
                               key)
    with ctx.stage("vlm"):
        v_ref = vlm_embeddings(ctx, ctx.vlm, ref.images, f"{key}|reference")
    t = bank.tensors
    o_ref = (v_ref @ t["concepts.T"].T - t["projection.vlm_mu"]) / t["projection.vlm_sigma"]
    s_ref = project_features(z_ref, bank.projection())
    with ctx.stage("concept_check"):
        comp, metrics = concept_check(o_ref, s_ref, ref.labels.astype(np.int64), z_cal,
                                      cal.labels.astype(np.int64), head_weights(model),
                                      t["aligner.W"], t["concepts.T"], m.classes, cs,
                                      threshold, cfg.seed)
    store(bank_dir, comp, metrics)
    return {"competence": comp, "metrics": metrics, "timings_s": dict(ctx.timings)}


def store(bank_dir: Path, comp: dict, metrics: dict) -> None:
    """Write the check into the manifest and metrics.json (each atomically; the bank's
    checked files are unchanged)."""
    bank_dir = Path(bank_dir)
    raw = json.loads((bank_dir / bankio.MANIFEST).read_text())
    raw["concept_competence"] = comp
    manifest = bankio.Manifest.model_validate(raw)
    bankio.write_manifest(bank_dir, manifest)
    path = bank_dir / "report" / "metrics.json"
    if path.is_file():
        mt = json.loads(path.read_text())
        mt["concepts"] = metrics
        bankio.atomic_write_text(path, json.dumps(mt, indent=2))
