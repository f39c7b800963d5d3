"""diagnose: what changed in a candidate classifier, what limits each confused pair, and
whether retraining the head fixes it (the math: ``conceptguard.diagnosis`` and
``conceptguard.repair``; this module reads the data and the bank, and writes the results).

Reads the bank (its classifier, the shared feature covariance of its Mahalanobis detector,
its projection and, where the bank has one, its concept competence check) and the data
through the job config (the reference split for the probes and the repair, the test split for
errors and their effects). Features are cached under the same keys as build-bank's. Nothing
in the bank is rebuilt or changed.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from conceptguard import bank as bankio
from conceptguard.atomic import atomic_path
from conceptguard.classifier.io import ClassifierSpec, load_classifier, save_classifier
from conceptguard.data import DataMismatch, check_same_data, load_source, make_splits
from conceptguard.diagnosis import (
    LimitRule,
    agrees,
    changed_verdict,
    confused_pairs,
    features_whitening,
    fix_shares,
    fixed_errors,
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
from conceptguard.repair import fit_class_head, head_weights, with_head
from conceptguard.threads import single_threaded_blas
from offline.build_context import Context, torch_features
from offline.cache import ArrayCache
from offline.config import JobConfig

NOTE = ("changed: the candidate's new test errors (right with the bank's classifier, wrong "
        "now) re-scored with the candidate's encoder under the bank's head (encoder_share) "
        "and the bank's encoder under the candidate's head (head_share); fixed_by: the same "
        "for the errors it fixed (wrong with the bank's classifier, right now). limit: from the "
        "candidate's own reference-split features: a 5-fold cross-validated pairwise linear "
        "probe (penalty tuned by nested cross-validation) against the head's own a-vs-b "
        "decision (probe well above head, or the bank's head better on the same features: "
        "head; about equal, and against the bank's classifier separation lost: encoder; "
        "otherwise abstain). repair: a class-balanced logistic head retrained on the "
        "candidate's reference-split features (encoder frozen), measured on the test split, "
        "which it never saw, by the errors between the pair's two classes.")


class DiagnoseInputError(ValueError):
    """Input that cannot be diagnosed against this bank (exit status 2)."""


@dataclass(frozen=True)
class DiagnoseOptions:
    classifier: Path | None = None  # the candidate (default: the bank's own classifier)
    repair_out: Path | None = None
    top_pairs: int = 8
    min_errors: int = 5
    min_new_errors: int = 5
    folds: int = 5
    test_limit: int | None = None  # the first N test-split inputs (default: all)
    paper_rule: bool = True
    progress: bool = True


def check_candidate(spec: ClassifierSpec, manifest: bankio.Manifest, feature_dim: int,
                    path: Path) -> None:
    """The candidate must have the bank's classes, input shape and feature size."""
    if spec.classes is not None and list(spec.classes) != list(manifest.classes):
        raise DiagnoseInputError(f"{path}: classes {spec.classes} differ from the bank's "
                                 f"{manifest.classes}")
    if spec.num_classes != len(manifest.classes):
        raise DiagnoseInputError(f"{path}: {spec.num_classes} classes, the bank has "
                                 f"{len(manifest.classes)}")
    p = manifest.preprocessing
    if (spec.in_channels, spec.input_size) != (p.channels, p.input_size):
        raise DiagnoseInputError(
            f"{path}: input shape {spec.in_channels}x{spec.input_size}x{spec.input_size}, "
            f"the bank's is {p.channels}x{p.input_size}x{p.input_size}")
    if feature_dim != manifest.dims.features:
        raise DiagnoseInputError(f"{path}: {feature_dim} features, the bank's classifier "
                                 f"has {manifest.dims.features}")


def _load_model(path: Path):
    try:
        return load_classifier(path)
    except FileNotFoundError as exc:
        raise DiagnoseInputError(f"classifier file not found: {path}") from exc
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DiagnoseInputError(f"{path} is not a classifier in conceptguard's safetensors "
                                 f"format: {first}") from exc


def concept_competence(manifest: bankio.Manifest) -> dict | None:
    """The bank's concept competence check (``check-concepts``), or None."""
    extra = manifest.model_extra or {}
    return extra.get("concept_competence")


def pair_concepts(competence: dict | None, classes: list[str], a: int, b: int
                  ) -> tuple[list[dict], str | None]:
    """Named concepts of a confused pair where the check shows the VLM and the aligner
    separate it; otherwise none and the reason."""
    if competence is None:
        return [], ("the bank has no concept competence check (conceptguard check-concepts "
                    "adds one)")
    entry = competence.get("pairs", {}).get(f"{classes[a]}|{classes[b]}") or \
        competence.get("pairs", {}).get(f"{classes[b]}|{classes[a]}")
    if entry is None:
        return [], "the competence check did not measure this pair"
    if not entry["competent"]:
        return [], (f"concepts unavailable for {classes[a]} vs {classes[b]}: the VLM's concept "
                    f"profiles separate them with accuracy {entry['vlm_accuracy']:.2f} and the "
                    f"aligned ones with {entry['model_accuracy']:.2f}, below "
                    f"{competence['threshold']:.2f}")
    return list(entry.get("concepts", [])), None


def _pairs_to_diagnose(y: np.ndarray, swap, opts: DiagnoseOptions, same: bool
                       ) -> list[tuple[int, int, int]]:
    """The ``opts.top_pairs`` confused pairs ``(true, predicted, errors)`` with at least
    ``opts.min_errors`` errors: the most frequent for the bank's own classifier; for a
    candidate, those with the most new errors first (a pair the change broke is listed
    before an old hard pair with more errors), then the most frequent."""
    pairs = confused_pairs(y, swap.candidate, opts.min_errors)
    if not same:
        new = new_errors(y, swap)
        fresh = {(t, q): int(c) for t, q, c in confused_pairs(y[new], swap.candidate[new])}
        pairs.sort(key=lambda p: (-fresh.get((p[0], p[1]), 0), -p[2], p[0], p[1]))
    return pairs[:opts.top_pairs]


def diagnose(cfg: JobConfig, bank_dir: Path, out_dir: Path, opts: DiagnoseOptions) -> dict:
    """Run the diagnosis; write ``diagnosis.json``, ``diagnosis.html`` and ``diagnosis.png``
    into ``out_dir`` (and the repaired classifier with ``opts.repair_out``)."""
    t0 = time.perf_counter()
    ctx = Context(cfg, ArrayCache(cfg.cache_dir), opts.progress)
    single_threaded_blas()  # many small fits: BLAS threads only spin-wait on busy cores
    bank = bankio.load_bank(bank_dir)
    m = bank.manifest
    ref_model, _, ref_hash = _load_model(bank.classifier_path)
    cand_path = opts.classifier or bank.classifier_path
    cand_model, cand_spec, cand_hash = _load_model(cand_path)
    check_candidate(cand_spec, m, cand_model.feature_dim, cand_path)
    ref_head, cand_head = head_weights(ref_model), head_weights(cand_model)
    with ctx.stage("data"):
        train, test = load_source(cfg.data)
        if list(train.classes) != list(m.classes):
            raise DiagnoseInputError(f"the config's dataset has classes {train.classes}, the "
                                     f"bank {m.classes}")
        splits = make_splits(len(train), len(test), cfg.splits)
        try:
            check_same_data(m.data, train, test, splits, cfg.data.root)
        except DataMismatch as exc:
            raise DiagnoseInputError(str(exc)) from None
        reference, tst = train.subset(splits.reference), test.subset(splits.test)
        if opts.test_limit is not None:
            tst = tst.subset(np.arange(min(opts.test_limit, len(tst))))
        data_key = f"{cfg.data.cache_key()}|{splits.digest()}"
        test_split = "test" if opts.test_limit is None else f"test:{len(tst)}"
    y_ref, y = reference.labels.astype(np.int64), tst.labels.astype(np.int64)
    with ctx.stage("features"):
        def feats(path: Path, chash: str, images: np.ndarray, split: str) -> np.ndarray:
            return torch_features(ctx, path, chash, images, split, data_key)
        z_t0 = feats(bank.classifier_path, ref_hash, tst.images, test_split)
        same = cand_hash == ref_hash
        z_t1 = z_t0 if same else feats(cand_path, cand_hash, tst.images, test_split)
        z_r1 = feats(cand_path, cand_hash, reference.images, "reference")
        # the bank's own features of the reference split: how much separation was lost
        z_r0 = None if same else feats(bank.classifier_path, ref_hash, reference.images,
                                       "reference")
    swap = swap_predictions(z_t0, z_t1, ref_head, cand_head)
    with ctx.stage("repair"):
        W_r, b_r = fit_class_head(z_r1, y_ref, len(m.classes))
        pred_r = head_logits(z_t1, W_r, b_r).argmax(1)
        if opts.repair_out is not None:
            save_classifier(with_head(cand_model, W_r, b_r), cand_spec, Path(opts.repair_out))
    competence = concept_competence(m)
    # the Mahalanobis distances in the units of the diagnosed classifier's own features
    whiten = (bank.tensors["detector.mahalanobis.whiten"] if same
              else features_whitening(z_r1, y_ref, len(m.classes)))
    classes = m.classes
    pairs_out = []
    with ctx.stage("pairs"):
        for t, q, n in _pairs_to_diagnose(y, swap, opts, same):
            rows = (y == t) & (swap.candidate == q)
            shares = swap_shares(y, swap, rows)
            geo = pair_geometry(z_r1, y_ref, t, q, *cand_head, whiten=whiten,
                                folds=opts.folds, seed=cfg.seed,
                                reference_head=None if same else ref_head, reference_z=z_r0)
            limit = limit_verdict(geo, LimitRule())
            floor = None if same else pair_errors(y, swap.reference, t, q)
            outcome = repair_outcome(pair_errors(y, swap.candidate, t, q),
                                     pair_errors(y, pred_r, t, q), floor)
            outcome.update({"before": round(pair_accuracy(y, swap.candidate, t, q), 4),
                            "after": round(pair_accuracy(y, pred_r, t, q), 4),
                            "agrees_with_limit": agrees(limit, outcome)})
            concepts, why = pair_concepts(competence, classes, t, q)
            entry: dict[str, Any] = {
                "true": classes[t], "predicted": classes[q], "errors": n,
                "new_errors": shares["new_errors"],
                "changed": changed_verdict(shares, opts.min_new_errors),
                "limit": limit,
                "evidence": {"changed": shares, "geometry": geo},
                "concepts": concepts, "repair": outcome}
            if why is not None:
                entry["concepts_unavailable"] = why
            pairs_out.append(entry)
    if opts.paper_rule and pairs_out:
        with ctx.stage("paper_rule"):
            _add_paper_rule(ctx, bank, tst.images, y, swap.candidate, z_t1, pairs_out,
                            data_key, test_split)
    all_rows = np.ones(len(y), bool)
    shares_all = swap_shares(y, swap, all_rows)
    fixes = fix_shares(y, swap, all_rows)
    agreement = [p["repair"]["agrees_with_limit"] for p in pairs_out]
    decided = [a for a in agreement if a is not None]
    result = {
        "note": NOTE,
        "bank": {"path": str(bank_dir), "bank_id": m.bank_id,
                 "classifier_hash": m.classifier.hash},
        "classifier": {
            "path": str(cand_path), "hash": cand_hash, "is_bank_classifier": same,
            "test_accuracy": round(float((swap.candidate == y).mean()), 5),
            "bank_classifier_test_accuracy": round(float((swap.reference == y).mean()), 5),
            "new_errors": int(new_errors(y, swap).sum()),
            "changed": changed_verdict(shares_all, opts.min_new_errors),
            # the other side of a change: the errors it fixed, and which component's swap
            # alone also fixes them (the same rule as ``changed``)
            "fixed_errors": int(fixed_errors(y, swap).sum()),
            "fixed_by": changed_verdict(fixes, opts.min_new_errors),
            "evidence": {**shares_all, **parameter_shift(z_t0, z_t1, ref_head, cand_head),
                         "fixed": {"encoder_share": fixes["encoder_share"],
                                   "head_share": fixes["head_share"]}},
        },
        "data": {"config": cfg.name, "reference_n": int(len(y_ref)), "test_n": int(len(y)),
                 "splits_match_bank": splits.digest() == m.data.get("splits_digest")},
        "pairs": pairs_out,
        "repair": {
            "method": "last-layer retraining: class-balanced multinomial logistic head on "
                      "the candidate's reference-split features, encoder frozen",
            "fit_n": int(len(y_ref)), "evaluated_on": "test split",
            "accuracy_before": round(float((swap.candidate == y).mean()), 5),
            "accuracy_after": round(float((pred_r == y).mean()), 5),
            "written_to": None if opts.repair_out is None else str(opts.repair_out),
            "limit_agreement": round(sum(decided) / len(decided), 4) if decided else None,
            "decided_pairs": len(decided),
        },
        "concept_competence": None if competence is None else {
            k: competence[k] for k in ("threshold", "method") if k in competence},
        "timings_s": {**ctx.timings, "total": round(time.perf_counter() - t0, 2)},
    }
    write_outputs(Path(out_dir), result)
    return result


def _add_paper_rule(ctx: Context, bank: bankio.Bank, images: np.ndarray, labels: np.ndarray,
                    pred: np.ndarray, z: np.ndarray, pairs: list[dict], data_key: str,
                    split: str) -> None:
    """The paper's per-input rule on each pair's errors (a reported mode): the VLM's
    zero-shot label (oracle) and the bank's aligner on the candidate's features (encoder
    view) against the bank's class prompts."""
    import hashlib

    from conceptguard.faults import (
        encoder_view_labels,
        localise,
        verdict_counts,
        zero_shot_labels,
    )
    from offline.build_context import vlm_embeddings

    classes = bank.manifest.classes
    index = {classes[i]: i for i in range(len(classes))}
    wanted = np.zeros(len(labels), bool)
    for p in pairs:
        wanted |= (labels == index[p["true"]]) & (pred == index[p["predicted"]])
    idx = np.flatnonzero(wanted)
    digest = hashlib.sha256(np.ascontiguousarray(idx, np.int64).tobytes()).hexdigest()[:20]
    v = vlm_embeddings(ctx, ctx.vlm, images[idx], f"{data_key}|{split}|{digest}")
    class_T = bank.tensors["classes.T"]
    oracle = zero_shot_labels(v, class_T)
    enc = encoder_view_labels(z[idx], bank.tensors["aligner.W"], bank.tensors["aligner.b"],
                              class_T)
    verdict = localise(labels[idx], pred[idx], oracle, enc)
    for p in pairs:
        rows = (labels[idx] == index[p["true"]]) & (pred[idx] == index[p["predicted"]])
        p["paper_rule"] = verdict_counts(verdict[rows])


# ------------------------------------------------------------------ outputs


def write_outputs(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bankio.atomic_write_text(out / "diagnosis.json", json.dumps(result, indent=2))
    figure_png(result, out / "diagnosis.png")
    bankio.atomic_write_text(out / "diagnosis.html", render_html(result))


def figure_png(result: dict, path: Path) -> None:
    """Per pair: probe vs. head accuracy (the limit), and pair accuracy before/after the
    head-only repair (its test)."""
    pairs = result["pairs"]
    names = [f"{p['true']} → {p['predicted']}" for p in pairs] or ["(no confused pair)"]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.5 * len(names)), 4.6), dpi=110)
    g = [p["evidence"]["geometry"] for p in pairs]
    axes[0].bar(x - 0.2, [e["probe_accuracy"] for e in g], 0.4, label="linear probe (5-fold)")
    axes[0].bar(x + 0.2, [e["head_accuracy"] for e in g], 0.4, label="the head, a vs b")
    axes[0].set_title("what limits the pair (reference split)")
    r = [p["repair"] for p in pairs]
    axes[1].bar(x - 0.2, [e["before"] for e in r], 0.4, label="candidate")
    axes[1].bar(x + 0.2, [e["after"] for e in r], 0.4, label="head retrained")
    axes[1].set_title("pair accuracy (test split)")
    values = [e[k] for e in g for k in ("probe_accuracy", "head_accuracy")] + \
        [e[k] for e in r for k in ("before", "after")]
    low = min([0.5, *[v - 0.05 for v in values]])
    for ax in axes:
        ax.set_xticks(x, labels=names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(max(low, 0.0), 1.02)
        ax.legend(fontsize=8, loc="lower left")
    for i, p in enumerate(pairs):
        axes[0].text(i, 1.0, p["limit"], ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:  # a reader never sees half a picture
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if v is None:
        return "–"
    return html.escape(str(v))


def render_html(result: dict) -> str:
    c, r = result["classifier"], result["repair"]
    head = ["true → predicted", "errors", "new errors", "changed (enc / head share)",
            "probe", "head a-vs-b", "angle°", "bias offset", "Mahalanobis", "limit",
            "repair: a↔b errors before → after", "pair acc before → after", "agrees",
            "paper rule h / e / amb",
            "concepts"]
    rows = []
    for p in result["pairs"]:
        g, ch, rp = p["evidence"]["geometry"], p["evidence"]["changed"], p["repair"]
        pr = p.get("paper_rule")
        concepts = ", ".join(x["concept"] for x in p["concepts"]) or \
            p.get("concepts_unavailable", "–")
        rows.append([f"{p['true']} → {p['predicted']}", p["errors"], p["new_errors"],
                     f"{p['changed']} ({ch['encoder_share']:.2f} / {ch['head_share']:.2f})",
                     g["probe_accuracy"], g["head_accuracy"], g["angle_deg"],
                     g["bias_offset"], g.get("mahalanobis"), p["limit"],
                     f"{rp['errors_before']} → {rp['errors_after']}",
                     f"{rp['before']:.3f} → {rp['after']:.3f}", rp["agrees_with_limit"],
                     "–" if pr is None else f"{pr['head']} / {pr['encoder']} / "
                                            f"{pr['ambiguous']}", concepts])
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                     for row in rows) + "</table>"
    ev = c["evidence"]
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>conceptguard diagnosis</title><style>
body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;
font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}
th{{background:#f3f3f3}}</style></head><body>
<h1>Diagnosis of {html.escape(Path(c['path']).name)}</h1>
<p>Bank {html.escape(result['bank']['bank_id'])}; candidate hash {html.escape(c['hash'][:12])}…
{'(the bank&#39;s own classifier)' if c['is_bank_classifier'] else ''}.
Test accuracy {c['test_accuracy']:.4f} (bank's classifier {c['bank_classifier_test_accuracy']:.4f});
new errors {c['new_errors']}; <b>changed: {html.escape(c['changed'])}</b>
(encoder share {ev['encoder_share']:.2f}, head share {ev['head_share']:.2f}, feature shift
{ev['feature_shift']:.3f}, head shift {ev['head_shift']:.3f}); errors fixed
{c['fixed_errors']}, <b>fixed by: {html.escape(c['fixed_by'])}</b> (encoder share
{ev['fixed']['encoder_share']:.2f}, head share {ev['fixed']['head_share']:.2f}).</p>
<p>Head-only repair ({html.escape(r['method'])}): test accuracy {r['accuracy_before']:.4f} →
{r['accuracy_after']:.4f}; the limit verdict agrees with the repair's measured effect on
{_cell(r['limit_agreement'])} of {r['decided_pairs']} decided pairs.</p>
<img src="diagnosis.png" alt="probe vs head and repair per pair" style="max-width:100%">
<h2>Confused pairs</h2>{table}
<p style="font-size:12px;color:#555">{html.escape(result['note'])}</p>
</body></html>
"""
