"""inject-faults: fault localisation measured on classifier variants with known faults.

For each variant (``conceptguard.fault_injection``) this recomputes what fault localisation
reads, with the variant in place of the bank's classifier: its features on the fit split
(the aligner is refitted on them against the cached VLM fit embeddings, as build-bank would)
and on the test images the VLM saw, the encoder view (aligned features vs. class prompts),
and the oracle (the VLM's zero-shot label, or a simulated oracle of known accuracy p). The
variant's NEW errors (wrong now, right with the bank's classifier) that the fault is meant
to cause are localised; ``accuracy`` is the share attributed to the injected component.

The rest of a bank (heatmaps, calibration, evaluation, ONNX export) is not rebuilt for a
variant: localisation reads none of it, and rebuilding it would take an hour per variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conceptguard import bank as bankio
from conceptguard.aligner import fit_aligner
from conceptguard.classifier.inference import predict, to_tensor
from conceptguard.classifier.io import load_classifier, save_classifier
from conceptguard.concepts import class_matrix, concept_matrix, load_concept_set
from conceptguard.data import load_source, make_splits
from conceptguard.fault_injection import (
    Fault,
    bias_shift,
    encoder_ablate,
    encoder_merge,
    head_blend,
    head_swap,
    localisation_accuracy,
    simulated_oracle,
)
from conceptguard.faults import localise
from conceptguard.projection import aligned_embedding
from conceptguard.threads import single_threaded_blas
from offline.cache import ArrayCache
from offline.config import JobConfig
from offline.pipeline import Context, LazyVLM, _concept_set_digest, _digest, vlm_embeddings

ORACLE_PS = (0.5, 0.8, 0.95, 1.0)
NOTE = ("Variants of the bank's classifier with one injected fault each; for each, the "
        "aligner is refitted on the variant's fit-split features (cached VLM embeddings) and "
        "its new errors on the test images the VLM saw (right with the bank's classifier, "
        "wrong with the variant) that the fault targets are localised. accuracy: share of "
        "them attributed to the injected component (ambiguous = not attributed); "
        "decided_accuracy: among the non-ambiguous verdicts; simulated_oracle.<p>: the same "
        "with an oracle that names the true label with probability p (else a random wrong "
        "label). Only what localisation reads is recomputed per variant, not the whole bank. "
        "original_aligner: the same with the bank's aligner kept (fitted on the original "
        "classifier), i.e. the classifier changed under an unchanged bank.")


def demo_variants(classes: list[str]) -> list[dict]:
    """The default fault set, by class name where the dataset has them (Fashion-MNIST)."""
    def idx(name: str, fallback: int) -> int:
        return classes.index(name) if name in classes else fallback % len(classes)
    trouser, bag, sneaker, boot, shirt = (idx("Trouser", 1), idx("Bag", 8), idx("Sneaker", 7),
                                          idx("Ankle boot", 9), idx("Shirt", 6))
    return [
        {"name": "head_swap", "kind": "head_swap", "a": trouser, "b": bag},
        {"name": "head_blend", "kind": "head_blend", "a": sneaker, "b": boot, "alpha": 0.6},
        {"name": "bias_shift", "kind": "bias_shift", "c": shirt, "delta": 4.0},
        {"name": "encoder_ablate", "kind": "encoder_ablate", "block": "layer3",
         "fraction": 0.5, "seed": 0},
        {"name": "encoder_merge", "kind": "encoder_merge", "a": trouser, "b": bag,
         "steps": 200},
    ]


def make_variant(model, spec: dict, train_images: np.ndarray, train_labels: np.ndarray,
                 seed: int) -> tuple[torch.nn.Module, Fault]:
    kind = spec["kind"]
    if kind == "head_swap":
        return head_swap(model, spec["a"], spec["b"])
    if kind == "head_blend":
        return head_blend(model, spec["a"], spec["b"], spec["alpha"])
    if kind == "bias_shift":
        return bias_shift(model, spec["c"], spec["delta"])
    if kind == "encoder_ablate":
        return encoder_ablate(model, spec["block"], spec["fraction"], spec["seed"])
    if kind == "encoder_merge":
        return encoder_merge(model, spec["a"], spec["b"], to_tensor(train_images),
                             torch.as_tensor(train_labels, dtype=torch.long),
                             steps=spec["steps"], seed=seed)
    raise ValueError(f"unknown fault kind {kind!r}")


def evaluate_variant(fault: Fault, labels: np.ndarray, pred0: np.ndarray, pred: np.ndarray,
                     enc: np.ndarray, oracle: np.ndarray, num_classes: int,
                     ps: tuple[float, ...] = ORACLE_PS, seed: int = 0) -> dict:
    """Localisation of the variant's new injected errors with the given oracle and with
    simulated oracles of accuracy ``p``."""
    new = (pred != labels) & (pred0 == labels)
    rows = new & fault.injected(labels, pred)
    y, q, e = labels[rows], pred[rows], enc[rows]
    out = {"kind": fault.kind, "component": fault.component, "params": fault.params,
           "new_errors": int(new.sum()), "injected_errors": int(rows.sum()),
           "encoder_view_accuracy": round(float((e == y).mean()), 5) if len(y) else None,
           **localisation_accuracy(localise(y, q, oracle[rows], e), fault.component)}
    out["simulated_oracle"] = {}
    for p in ps:
        sim = simulated_oracle(labels, num_classes, p, seed)[rows]
        res = localisation_accuracy(localise(y, q, sim, e), fault.component)
        out["simulated_oracle"][str(p)] = res
    return out


def run_variant(variant, fault: Fault, fit_images: np.ndarray, v_fit: np.ndarray,
                images: np.ndarray, labels: np.ndarray, pred0: np.ndarray,
                oracle: np.ndarray, class_T: np.ndarray, seed: int = 0,
                ps: tuple[float, ...] = ORACLE_PS,
                original_aligner: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Refit the aligner on the variant's fit features, read the encoder view on ``images``
    and localise the variant's new injected errors (``pred0``: the original predictions).
    With ``original_aligner`` ``(W, b)`` (fitted on the original classifier), the same again
    under ``original_aligner``: the bank not rebuilt, the classifier changed under it."""
    aligner = fit_aligner(predict(variant, fit_images)[1], v_fit, seed=seed)
    logits, z = predict(variant, images)
    enc = (aligned_embedding(z, aligner.W, aligner.b) @ class_T.T).argmax(1)
    pred = logits.argmax(1)
    res = evaluate_variant(fault, labels, pred0, pred, enc, oracle, len(class_T), ps, seed)
    res["variant_accuracy"] = round(float((pred == labels).mean()), 5)
    if original_aligner is not None:  # the bank kept, the classifier changed under it
        W, b = original_aligner
        enc0 = (aligned_embedding(z, W, b) @ class_T.T).argmax(1)
        kept = evaluate_variant(fault, labels, pred0, pred, enc0, oracle, len(class_T), ps,
                                seed)
        res["original_aligner"] = {k: kept[k] for k in (
            "head", "encoder", "ambiguous", "accuracy", "decided_accuracy",
            "encoder_view_accuracy", "simulated_oracle")}
    return res


def inject_faults(cfg: JobConfig, bank: Path, *, variants: list[dict] | None = None,
                  save_dir: Path | None = None, progress: bool = True,
                  write: bool = True) -> dict:
    """Run every variant; write ``fault_injection`` (per variant) and
    ``fault_injection_info`` into ``<bank>/report/metrics.json``, and the summary table
    to ``<bank>/report/fault_injection.md``."""
    ctx = Context(cfg, ArrayCache(cfg.cache_dir), progress)
    single_threaded_blas()
    seed = cfg.seed
    torch.manual_seed(seed)
    with ctx.stage("data"):
        train, test = load_source(cfg.data)
        splits = make_splits(len(train), len(test), cfg.splits)
        fit, calib, tst = (train.subset(splits.fit), train.subset(splits.calibration),
                           test.subset(splits.test))
        data_key = f"{cfg.data.cache_key()}|{splits.digest()}"
        classes = train.classes
    model, cspec, chash = load_classifier(bank / bankio.CLASSIFIER)
    vlm = LazyVLM(cfg)
    cs = load_concept_set(cfg.concepts)
    with ctx.stage("vlm"):
        class_T = ctx.cache.get_or_compute(
            "vlm-texts", {"vlm": vlm.id, "concepts": _concept_set_digest(cs),
                          "classes": cfg.class_prompts or classes},
            lambda: {"T": concept_matrix(vlm.get(), cs),
                     "C": class_matrix(vlm.get(), cfg.class_prompts or classes,
                                       cs.class_templates, cs.class_aliases)})["C"]
        v_fit = vlm_embeddings(ctx, vlm, fit.images, data_key + "|fit")
        logits0, _ = predict(model, tst.images)
        first = np.zeros(len(tst), bool)
        first[: cfg.evaluation.vlm_test_images] = True
        vlm_idx = np.flatnonzero(first | (logits0.argmax(1) != tst.labels))
        v_test = vlm_embeddings(ctx, vlm, tst.images[vlm_idx],
                                data_key + "|test|" + _digest(vlm_idx))
    # candidates: the first vlm_test_images test images (the others the VLM saw were already
    # wrong with the bank's classifier, so they cannot be new errors)
    sub = vlm_idx < cfg.evaluation.vlm_test_images
    images, labels = tst.images[vlm_idx[sub]], tst.labels[vlm_idx[sub]]
    oracle = (v_test[sub] @ class_T.T).argmax(1)
    pred0 = logits0[vlm_idx[sub]].argmax(1)
    a0 = fit_aligner(predict(model, fit.images)[1], v_fit, seed=seed)
    n_train = min(2000, len(calib))  # encoder fine-tuning: a calibration-split subset
    results: dict = {}
    for spec in variants or demo_variants(classes):
        with ctx.stage(f"variant_{spec['name']}"):
            variant, fault = make_variant(model, spec, calib.images[:n_train],
                                          calib.labels[:n_train], seed)
            if save_dir is not None:
                save_classifier(variant, cspec, Path(save_dir) / f"{spec['name']}.safetensors")
            res = run_variant(variant, fault, fit.images, v_fit, images, labels, pred0,
                              oracle, class_T, seed, original_aligner=(a0.W, a0.b))
            if fault.pair is not None:
                res["pair"] = [classes[fault.pair[0]], classes[fault.pair[1]]]
            if fault.target is not None:
                res["target"] = classes[fault.target]
            results[spec["name"]] = res
    info = {"note": NOTE, "classifier_hash": chash, "candidates": int(len(labels)),
            "original_accuracy": round(float((pred0 == labels).mean()), 5),
            "vlm_zero_shot_accuracy": round(float((oracle == labels).mean()), 5),
            "oracle_ps": list(ORACLE_PS), "timings_s": dict(ctx.timings)}
    if write:
        path = bank / "report" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["fault_injection"] = results
        metrics["fault_injection_info"] = info
        bankio.atomic_write_text(path, json.dumps(metrics, indent=2))
        bankio.atomic_write_text(bank / "report" / "fault_injection.md",
                                 f"# Fault injection\n\n{NOTE}\n\n{summary_table(results)}\n")
    return {"variants": results, "info": info}


def summary_table(results: dict) -> str:
    """A markdown table: per variant, the injected errors and the localisation accuracy with
    the packaged VLM and with each simulated oracle."""
    ps = next(iter(results.values()))["simulated_oracle"].keys() if results else []
    head = ["variant", "component", "injected errors", "head / encoder / ambiguous",
            "accuracy (VLM)", "encoder view right", *[f"accuracy (oracle p={p})" for p in ps],
            "bank's aligner kept: accuracy (VLM / p=1)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}%"
        lines.append("| " + " | ".join([
            name, r["component"], str(r["injected_errors"]),
            f"{r['head']} / {r['encoder']} / {r['ambiguous']}", pct(r["accuracy"]),
            pct(r["encoder_view_accuracy"]),
            *[pct(r["simulated_oracle"][p]["accuracy"]) for p in ps],
            _kept(r.get("original_aligner"), pct)]) + " |")
    return "\n".join(lines)


def _kept(o: dict | None, pct) -> str:
    if o is None:
        return "-"
    perfect = o["simulated_oracle"].get("1.0")
    return f"{pct(o['accuracy'])} / {pct(perfect['accuracy']) if perfect else '-'}"
