"""inject-faults: the debugging questions measured on classifier variants with known faults.

Every fault kind of :mod:`conceptguard.faults` at three severities and three seeds
(:func:`fault_grid`) is scored (:func:`score_variant`) on what ``conceptguard diagnose``
answers: ``changed`` against the injected component; ``limit`` of each faulty pair against
the measured effect of the head-only repair (last-layer retraining on reference features,
measured on test inputs it never saw); and the paper's per-input rule on the fault's new
errors (the bank's aligner on the variant's features, with the packaged VLM and a perfect
oracle). :func:`summarise` pools them with 95% intervals.

The bank is not rebuilt for a variant: the scoring reads the bank's feature covariance,
aligner and class prompts, and the variant's own features.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from conceptguard import bank as bankio
from conceptguard.aligner import fit_aligner
from conceptguard.classifier.inference import predict, to_tensor
from conceptguard.classifier.io import load_classifier, save_classifier
from conceptguard.data import check_same_data, load_source, make_splits
from conceptguard.diagnosis import (
    NONE,
    agrees,
    changed_verdict,
    confused_pairs,
    features_whitening,
    head_logits,
    limit_verdict,
    new_errors,
    pair_accuracy,
    pair_errors,
    pair_geometry,
    parameter_shift,
    repair_outcome,
    swap_predictions,
    swap_shares,
)
from conceptguard.faults import (
    HEAD,
    Fault,
    bias_shift,
    encoder_ablate,
    encoder_bn_drift,
    encoder_erase,
    encoder_merge,
    encoder_noise,
    encoder_view_labels,
    head_blend,
    head_scale,
    head_swap,
    score_localisation,
    simulated_oracle,
    zero_shot_labels,
)
from conceptguard.repair import fit_class_head, head_weights
from conceptguard.threads import single_threaded_blas
from offline.build_context import Context, torch_features, vlm_embeddings
from offline.cache import ArrayCache
from offline.config import JobConfig

ORACLE_PS = (0.5, 0.8, 0.95, 1.0)
NOTE = ("Variants of the bank's classifier with one injected fault each (every kind at 3 "
        "severities and 3 seeds). changed: the diagnosis of the variant's new test errors "
        "(right with the bank's classifier, wrong with the variant) by swapping encoder and "
        "head, against the injected component (variants with fewer than 5 new errors have no "
        "measurable effect and are not scored). limit: per faulty pair (at least 10 new "
        "errors between two classes, the 3 largest), from the variant's reference-split "
        "features (probe vs. head), against the measured effect of a head retrained on those "
        "features (fixed: it removes at least half of the errors between the two classes the "
        "fault added, on test inputs; fewer than 5 added errors: not measurable). paper rule: the "
        "per-input rule on the fault's new errors with the "
        "bank's aligner, with the packaged VLM as the oracle and with a perfect oracle. "
        "Intervals: Wilson 95%.")


def demo_variants(classes: list[str]) -> list[dict]:
    """The five original faults, by class name where the dataset has them (Fashion-MNIST)."""
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


# kind -> (parameter, its three severities, mild to severe)
SEVERITIES: dict[str, tuple[str, tuple[float, ...]]] = {
    "head_swap": ("pairs", (1, 2, 3)),
    "head_blend": ("alpha", (0.5, 0.6, 0.75)),
    "bias_shift": ("delta", (2.0, 4.0, 8.0)),
    "head_scale": ("factor", (1.3, 1.6, 2.0)),
    "encoder_ablate": ("fraction", (0.25, 0.5, 0.75)),
    "encoder_merge": ("steps", (50, 100, 200)),
    "encoder_erase": ("dims", (16, 32, 64)),
    "encoder_bn_drift": ("drift", (0.5, 1.0, 2.0)),
    "encoder_noise": ("sigma", (0.1, 0.2, 0.4)),
}


def fault_grid(num_classes: int, kinds: list[str] | None = None,
               seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
    """Every kind at its three severities and each seed; the seed also draws the classes
    a head fault or a merge acts on."""
    specs = []
    for kind in kinds or list(SEVERITIES):
        if kind not in SEVERITIES:
            raise ValueError(f"unknown fault kind {kind!r}; known: {sorted(SEVERITIES)}")
        param, levels = SEVERITIES[kind]
        for seed in seeds:
            rng = np.random.default_rng(1000 + seed)
            order = rng.permutation(num_classes).tolist()
            for level, value in enumerate(levels, 1):
                spec = {"name": f"{kind}-s{level}-seed{seed}", "kind": kind,
                        "severity": level, "seed": seed, param: value}
                if kind == "head_swap":
                    k = int(value)
                    spec.update({"a": order[0], "b": order[1],
                                 "more": [order[2 + 2 * i: 4 + 2 * i] for i in range(k - 1)]})
                elif kind in ("head_blend", "encoder_merge", "encoder_erase"):
                    spec.update({"a": order[0], "b": order[1]})
                elif kind in ("bias_shift", "head_scale"):
                    spec["c"] = order[0]
                elif kind == "encoder_ablate":
                    spec["block"] = "layer3"
                specs.append(spec)
    return specs


def make_variant(model, spec: dict, train_images: np.ndarray, train_labels: np.ndarray,
                 seed: int) -> tuple[torch.nn.Module, Fault]:
    kind = spec["kind"]
    if kind == "head_swap":
        return head_swap(model, spec["a"], spec["b"],
                         tuple(tuple(m) for m in spec.get("more", [])))
    if kind == "head_scale":
        return head_scale(model, spec["c"], spec["factor"])
    if kind == "encoder_bn_drift":
        return encoder_bn_drift(model, spec["drift"], spec.get("seed", seed))
    if kind == "encoder_noise":
        return encoder_noise(model, spec["sigma"], spec.get("seed", seed))
    if kind == "head_blend":
        return head_blend(model, spec["a"], spec["b"], spec["alpha"])
    if kind == "bias_shift":
        return bias_shift(model, spec["c"], spec["delta"])
    if kind == "encoder_ablate":
        return encoder_ablate(model, spec["block"], spec["fraction"], spec.get("seed", seed))
    if kind == "encoder_merge":
        return encoder_merge(model, spec["a"], spec["b"], to_tensor(train_images),
                             torch.as_tensor(train_labels, dtype=torch.long),
                             steps=int(spec["steps"]), seed=spec.get("seed", seed))
    if kind == "encoder_erase":
        return encoder_erase(model, spec["a"], spec["b"], to_tensor(train_images),
                             torch.as_tensor(train_labels, dtype=torch.long), int(spec["dims"]))
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
           **score_localisation(y, q, oracle[rows], e, fault.component)}
    out["simulated_oracle"] = {
        str(p): score_localisation(y, q, simulated_oracle(labels, num_classes, p, seed)[rows],
                                   e, fault.component)
        for p in ps}
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
    enc = encoder_view_labels(z, aligner.W, aligner.b, class_T)
    pred = logits.argmax(1)
    res = evaluate_variant(fault, labels, pred0, pred, enc, oracle, len(class_T), ps, seed)
    res["variant_accuracy"] = round(float((pred == labels).mean()), 5)
    if original_aligner is not None:  # the bank kept, the classifier changed under it
        W, b = original_aligner
        enc0 = encoder_view_labels(z, W, b, class_T)
        kept = evaluate_variant(fault, labels, pred0, pred, enc0, oracle, len(class_T), ps,
                                seed)
        res["original_aligner"] = {k: kept[k] for k in (
            "head", "encoder", "ambiguous", "accuracy", "decided_accuracy",
            "encoder_view_accuracy", "simulated_oracle")}
    return res


@dataclass(frozen=True)
class FaultData:
    """What every variant is scored on: the reference split (probes, repair), the first
    test-split inputs (errors, effects, the paper's rule) and the bank's features of both."""

    ref_images: np.ndarray
    y_ref: np.ndarray
    test_images: np.ndarray
    y_test: np.ndarray
    z_ref0: np.ndarray
    z_test0: np.ndarray
    oracle: np.ndarray  # the VLM's zero-shot labels of the test inputs
    train_images: np.ndarray  # encoder fine-tuning (a calibration-split subset)
    train_labels: np.ndarray


def score_variant(variant, fault: Fault, d: FaultData, ref_head, whiten: np.ndarray,
                  aligner: tuple[np.ndarray, np.ndarray], class_T: np.ndarray, *,
                  same_encoder: bool, min_new_errors: int = 5, min_pair_errors: int = 10,
                  top_pairs: int = 3, seed: int = 0,
                  reference_probes: dict | None = None) -> dict:
    """``diagnose``'s two questions on one variant, with their ground truth: ``changed``
    against the injected component, ``limit`` of each faulty pair (the variant's new errors
    between two classes, at least ``min_pair_errors``) against the measured effect of the
    head-only repair, and the paper's per-input rule on the fault's new errors."""
    cand_head = head_weights(variant)
    if same_encoder:
        z_ref1, z_test1 = d.z_ref0, d.z_test0
    else:
        z_ref1 = predict(variant, d.ref_images)[1]
        z_test1 = predict(variant, d.test_images)[1]
        whiten = features_whitening(z_ref1, d.y_ref, len(ref_head[1]))  # its own units
    y = d.y_test
    swap = swap_predictions(d.z_test0, z_test1, ref_head, cand_head)
    shares = swap_shares(y, swap, np.ones(len(y), bool))
    changed = changed_verdict(shares, min_new_errors)
    W_r, b_r = fit_class_head(z_ref1, d.y_ref, len(ref_head[1]))
    pred_r = head_logits(z_test1, W_r, b_r).argmax(1)
    new = new_errors(y, swap)
    pairs = []
    for t, q, n in confused_pairs(y[new], swap.candidate[new], min_pair_errors, top_pairs):
        geo = pair_geometry(z_ref1, d.y_ref, t, q, *cand_head, whiten=whiten, seed=seed,
                            reference_head=ref_head, reference_z=d.z_ref0,
                            reference_probes=reference_probes)
        limit = limit_verdict(geo)
        outcome = repair_outcome(pair_errors(y, swap.candidate, t, q),
                                 pair_errors(y, pred_r, t, q),
                                 pair_errors(y, swap.reference, t, q))
        outcome.update({"before": round(pair_accuracy(y, swap.candidate, t, q), 4),
                        "after": round(pair_accuracy(y, pred_r, t, q), 4),
                        "reference": round(pair_accuracy(y, swap.reference, t, q), 4)})
        pairs.append({"true": t, "predicted": q, "new_errors": n, "limit": limit,
                      "geometry": geo, "repair": outcome, "agrees": agrees(limit, outcome)})
    injected = new & fault.injected(y, swap.candidate)
    enc_view = encoder_view_labels(z_test1, *aligner, class_T)
    rows = injected
    paper = {"vlm": score_localisation(y[rows], swap.candidate[rows], d.oracle[rows],
                                       enc_view[rows], fault.component),
             "perfect_oracle": score_localisation(y[rows], swap.candidate[rows], y[rows],
                                                  enc_view[rows], fault.component)}
    return {"kind": fault.kind, "component": fault.component, "params": fault.params,
            "variant_accuracy": round(float((swap.candidate == y).mean()), 5),
            "new_errors": int(new.sum()), "injected_errors": int(rows.sum()),
            "changed": changed, "changed_right": None if changed == NONE else
            changed == fault.component,
            "changed_evidence": {**shares, **parameter_shift(d.z_test0, z_test1, ref_head,
                                                             cand_head)},
            "repair_accuracy": round(float((pred_r == y).mean()), 5),
            "pairs": pairs, "paper_rule": paper}


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """The Wilson score 95% interval of a proportion ``k / n`` (None when ``n`` is 0)."""
    if n == 0:
        return None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, round(float(centre - half), 4)), min(1.0, round(float(centre + half), 4))]


def _rate(k: int, n: int) -> dict:
    return {"value": round(k / n, 4) if n else None, "k": int(k), "n": int(n),
            "ci95": wilson(k, n)}


def summarise(variants: list[dict]) -> dict:
    """``changed_accuracy`` (variants with a measurable effect), ``limit_agreement`` (faulty
    pairs with a decided verdict and a measurable repair effect), ``abstain_rate`` (every
    faulty pair), the head repair's recovery where ``limit`` is head and the effect is
    measurable, the paper rule's accuracy (pooled over the faults' new errors), each with a
    Wilson 95% interval; and per kind."""
    def block(vs: list[dict]) -> dict:
        decided_changed = [v for v in vs if v["changed_right"] is not None]
        pairs = [p for v in vs for p in v["pairs"]]
        decided = [p for p in pairs if p["agrees"] is not None]
        head = [p for p in pairs if p["limit"] == "head" and p["repair"]["fixed"] is not None]
        recovered = [p["repair"]["recovered"] for p in head]
        out = {
            "variants": len(vs), "no_measurable_effect": len(vs) - len(decided_changed),
            "changed_accuracy": _rate(sum(v["changed_right"] for v in decided_changed),
                                      len(decided_changed)),
            "faulty_pairs": len(pairs),
            "limit_agreement": _rate(sum(p["agrees"] for p in decided), len(decided)),
            "abstain_rate": _rate(sum(p["limit"] == "abstain" for p in pairs), len(pairs)),
            "head_limit_recovered_90": _rate(sum(r >= 0.9 for r in recovered),
                                             len(recovered)),
            "head_limit_mean_recovered": round(float(np.mean(recovered)), 4)
            if recovered else None,
        }
        for mode in ("vlm", "perfect_oracle"):
            k = sum(v["paper_rule"][mode][v["component"]] for v in vs)
            n = sum(v["paper_rule"][mode]["n"] for v in vs)
            out[f"paper_rule_accuracy_{mode}"] = _rate(k, n)
        return out

    summary = block(variants)
    summary["by_kind"] = {k: block([v for v in variants if v["kind"] == k])
                          for k in dict.fromkeys(v["kind"] for v in variants)}
    return summary


def inject_faults(cfg: JobConfig, bank: Path, *, kinds: list[str] | None = None,
                  seeds: tuple[int, ...] = (0, 1, 2), test_n: int | None = None,
                  save_dir: Path | None = None, progress: bool = True,
                  write: bool = True) -> dict:
    """Every fault of :func:`fault_grid`, scored by :func:`score_variant`; write
    ``fault_injection`` (``summary``, ``variants``, ``info``) into
    ``<bank>/report/metrics.json`` and the tables to ``<bank>/report/fault_injection.md``.
    ``test_n``: the first test-split inputs scored (default: the config's
    ``evaluation.vlm_test_images``)."""
    t0 = time.perf_counter()
    ctx = Context(cfg, ArrayCache(cfg.cache_dir), progress)
    single_threaded_blas()
    torch.set_num_threads(1)  # many small forward passes: one thread each wastes least
    torch.manual_seed(cfg.seed)
    b = bankio.load_bank(bank)
    model, cspec, chash = load_classifier(b.classifier_path)
    with ctx.stage("data"):
        train, test = load_source(cfg.data)
        if list(train.classes) != list(b.manifest.classes):
            raise ValueError(f"the config's dataset has classes {train.classes}, the bank "
                             f"{b.manifest.classes}")
        splits = make_splits(len(train), len(test), cfg.splits)
        check_same_data(b.manifest.data, train, test, splits, cfg.data.root)
        ref, calib, tst = (train.subset(splits.reference), train.subset(splits.calibration),
                           test.subset(splits.test))
        n = min(test_n or cfg.evaluation.vlm_test_images, len(tst))
        tst = tst.subset(np.arange(n))
        data_key = f"{cfg.data.cache_key()}|{splits.digest()}"
    with ctx.stage("features"):
        z_ref0 = torch_features(ctx, b.classifier_path, chash, ref.images, "reference",
                                data_key)
        z_test0 = torch_features(ctx, b.classifier_path, chash, tst.images, f"test:{n}",
                                 data_key)
    with ctx.stage("vlm"):
        v = vlm_embeddings(ctx, ctx.vlm, tst.images, f"{data_key}|test:{n}")
    class_T = b.tensors["classes.T"]
    n_train = min(2000, len(calib))
    d = FaultData(ref.images, ref.labels.astype(np.int64), tst.images,
                  tst.labels.astype(np.int64), z_ref0, z_test0, zero_shot_labels(v, class_T),
                  calib.images[:n_train], calib.labels[:n_train])
    ref_head = head_weights(model)
    whiten = b.tensors["detector.mahalanobis.whiten"]
    aligner = (b.tensors["aligner.W"], b.tensors["aligner.b"])
    specs = fault_grid(len(b.manifest.classes), kinds, seeds)
    results = []
    reference_probes: dict = {}  # each pair's probe on the bank's features, fitted once
    classes = b.manifest.classes
    with ctx.stage("variants"):
        for spec in tqdm(specs, desc="fault variants", unit="variant", disable=not progress):
            variant, fault = make_variant(model, spec, d.train_images, d.train_labels,
                                          cfg.seed)
            if save_dir is not None and fault.kind != "encoder_erase":  # not the file's
                save_classifier(variant, cspec, Path(save_dir) / f"{spec['name']}.safetensors")
            res = score_variant(variant, fault, d, ref_head, whiten, aligner, class_T,
                                same_encoder=fault.component == HEAD, seed=cfg.seed,
                                reference_probes=reference_probes)
            for p in res["pairs"]:
                p["true"], p["predicted"] = classes[p["true"]], classes[p["predicted"]]
            results.append({"name": spec["name"], "severity": spec["severity"],
                            "seed": spec["seed"], **res})
    summary = summarise(results)
    info = {"note": NOTE, "classifier_hash": chash, "test_inputs": int(n),
            "reference_inputs": int(len(d.y_ref)),
            "original_accuracy": round(float((head_logits(z_test0, *ref_head).argmax(1)
                                              == d.y_test).mean()), 5),
            "vlm_zero_shot_accuracy": round(float((d.oracle == d.y_test).mean()), 5),
            "severities": {k: list(v[1]) for k, v in SEVERITIES.items()
                           if kinds is None or k in kinds},
            "seeds": list(seeds), "timings_s": {**ctx.timings,
                                                "total": round(time.perf_counter() - t0, 1)}}
    out = {"summary": summary, "variants": results, "info": info}
    if write:
        path = bank / "report" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics.pop("fault_injection_info", None)
        metrics["fault_injection"] = out
        bankio.atomic_write_text(path, json.dumps(metrics, indent=2))
        bankio.atomic_write_text(bank / "report" / "fault_injection.md",
                                 f"# Fault injection\n\n{NOTE}\n\n{summary_table(out)}\n")
    return out


def summary_table(out: dict) -> str:
    """Markdown: the summary over all variants and per kind (rates with 95% intervals)."""
    def rate(r: dict) -> str:
        if r["value"] is None:
            return "-"
        lo, hi = (max(0.0, v) for v in r["ci95"])  # a rounded 0 bound is 0, never -0
        return f"{100 * r['value']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}] (n={r['n']})"

    head = ["faults", "variants (no effect)", "changed right", "faulty pairs",
            "limit agrees with repair", "abstain", "limit=head: repair recovers >= 90%",
            "paper rule right (VLM)", "paper rule right (perfect oracle)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    s = out["summary"]
    for name, b in [("all", s), *s["by_kind"].items()]:
        lines.append("| " + " | ".join([
            name, f"{b['variants']} ({b['no_measurable_effect']})",
            rate(b["changed_accuracy"]), str(b["faulty_pairs"]), rate(b["limit_agreement"]),
            rate(b["abstain_rate"]), rate(b["head_limit_recovered_90"]),
            rate(b["paper_rule_accuracy_vlm"]),
            rate(b["paper_rule_accuracy_perfect_oracle"])]) + " |")
    return "\n".join(lines)


def paper_rule_table(results: dict) -> str:
    """A markdown table of :func:`run_variant` results: per variant, the injected errors
    and the paper rule's localisation accuracy with the packaged VLM and each oracle."""
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
