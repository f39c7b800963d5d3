"""Report rendering: PNG heatmaps (class x concept) and an HTML page over metrics.json."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from conceptguard.bank import Manifest
from offline.report_calibration import FIGURE as ESTIMATION_FIGURE
from offline.report_calibration import calibration_html, estimation_png

HEATMAP_FIGURES: tuple[tuple[str, str, str], ...] = (
    ("heatmaps.model.ok", "model view: correct H_ok", "RdBu_r"),
    ("heatmaps.model.bad", "model view: incorrect H_bad", "RdBu_r"),
    ("heatmaps.model.adv", "model view: adversarial H_adv", "RdBu_r"),
    ("heatmaps.model.diff", "model view: differential H_ok - H_bad", "PuOr_r"),
    ("heatmaps.model.diff_adv", "model view: differential H_ok - H_adv", "PuOr_r"),
    ("heatmaps.model.diff_bin", "model view: binarised differential sign(D)", "PuOr_r"),
    ("heatmaps.model.gt", "model view: ground truth H_gt", "RdBu_r"),
    ("heatmaps.vlm.ok", "VLM view: correct H_ok", "RdBu_r"),
    ("heatmaps.vlm.diff", "VLM view: differential H_ok - H_bad", "PuOr_r"),
)


def heatmap_png(matrix: np.ndarray, rows: list[str], cols: list[str], title: str,
                path: Path, cmap: str) -> None:
    m = np.asarray(matrix, dtype=np.float64)
    lim = float(np.nanmax(np.abs(m))) or 1.0
    fig_w = max(8.0, 0.32 * len(cols) + 2.5)
    fig_h = max(3.5, 0.38 * len(rows) + 2.2)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    im = ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=70, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=9)
    ax.set_xlabel("concept")
    ax.set_ylabel("class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="mean standardised score")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bar_png(metrics: dict, path: Path) -> None:
    """AUROC per method: misclassification, every shift, attack and foreign set."""
    tasks = {"misclassification": metrics["misclassification"]}
    for section, prefix in (("shift", ""), ("adversarial", ""), ("foreign", "foreign ")):
        tasks.update({f"{prefix}{k}": v for k, v in metrics.get(section, {}).items()
                      if "trust" in v})
    methods = ["trust", "paper_rule", "msp", "doctor", "energy", "mahalanobis", "knn", "vim"]
    fig, ax = plt.subplots(figsize=(max(13, 0.75 * len(tasks)), 4.6), dpi=110)
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [t.get(m, {}).get("auroc", np.nan) for t in tasks.values()]
        ax.bar(np.arange(len(tasks)) + i * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, labels=list(tasks), fontsize=8,
                  rotation=40, ha="right")
    ax.set_ylim(0.2, 1.0)
    ax.set_ylabel("AUROC")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("detection AUROC on the test split (higher is better)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _method_table(section: dict, keys: list[str], best_low: set[str]) -> str:
    """One row per method; the best value of each column in bold (ties all bold)."""
    methods = [m for m, v in section.items() if isinstance(v, dict) and keys[0] in v]
    best: dict[str, float] = {}
    for k in keys:
        vals = [section[m][k] for m in methods
                if isinstance(section[m].get(k), float | int) and np.isfinite(section[m][k])]
        if vals:
            best[k] = min(vals) if k in best_low else max(vals)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["method", *keys])
    body = []
    for m in methods:
        cells = [f"<td>{html.escape(m)}</td>"]
        for k in keys:
            v = section[m].get(k, "")
            text = html.escape(_fmt(v))
            if k in best and isinstance(v, float | int) and v == best[k]:
                text = f"<b>{text}</b>"
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = "best value per column in bold"
    if best_low:
        note += f"; lower is better: {', '.join(sorted(best_low))}"
    return (f"<table class=methods><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            f"</tbody></table><p class=note>{note}</p>")


def _ci_text(v: float, ci: list[float] | None) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


HEAD_SHORT = {"head_misclassification": "misclassification", "head_anomaly": "anomaly",
              "head_adversarial": "adversarial", "head_unfamiliar": "unfamiliar"}


def _diff_text(v: float, ci: list[float] | None) -> str:
    return f"{v:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def summary_html(rows: list[dict]) -> str:
    """Per task: the comparator chosen on the calibration stream, the best peer on the test
    data, trust, every head, and the best head's paired margins (bold where the margin's
    interval lies entirely below -0.005: the head trails)."""
    out = []
    for r in rows:
        heads = " / ".join(f"{r['heads'][h]:.3f}" for h in HEAD_SHORT if h in r.get("heads", {}))
        ci = r.get("head_vs_comparator_ci95")
        m = html.escape(_diff_text(r.get("head_vs_comparator", float("nan")), ci))
        if ci and ci[1] < -0.005:
            m = f"<b>{m}</b>"
        comp = _ci_text(r["comparator_auroc"], r["comparator_ci95"])
        cells = [r["task"], f"{r['comparator']} {comp}",
                 f"{r['best_peer']} {_ci_text(r['peer'], r['peer_ci95'])}",
                 _ci_text(r["trust"], r["trust_ci95"]), heads,
                 HEAD_SHORT.get(r.get("best_head", ""), "-")]
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
                   + f"<td>{m}</td><td>"
                   + html.escape(_diff_text(r.get("head_vs_best_peer", float("nan")),
                                            r.get("head_vs_best_peer_ci95")))
                   + f"</td><td>{r.get('p_head_behind_holm', float('nan')):.3f}</td>"
                   + f"<td>{html.escape(str(r.get('held_out')))}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in (
        "task", "comparator (calibration) [95% CI]", "best peer on test [95% CI]",
        "trust [95% CI]", "heads: misclassification / anomaly / adversarial / unfamiliar",
        "best head", "best head - comparator [95% CI]", "best head - best peer [95% CI]",
        "Holm p (behind by >= 0.005)", "held out"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(out)}</tbody></table>"


def compositions_html(metrics: dict) -> str:
    """Every method's AURC on each traffic mix, and the reject reasons' precision there."""
    parts = []
    for name, sec in metrics.get("mixed_compositions", {}).items():
        mix = ", ".join(f"{k} {v}" for k, v in sec["composition"].items())
        reasons = "; ".join(f"{k}: {_fmt(v['precision'])} (n={v['n']})"
                            for k, v in sec["reason_precision"].items())
        parts.append(f"<h3>{html.escape(name)} ({html.escape(mix)})</h3>"
                     f"<p class=note>reject reasons, precision: {html.escape(reasons)}</p>"
                     + _method_table(sec, ["aurc"], {"aurc"}))
    return "<h2>Traffic mixes</h2>" + "".join(parts) if parts else ""


def streams_html(rows: list[dict]) -> str:
    """Per traffic mix: trust's AURC against the lowest peer's, the paired difference, the
    largest upper bound of the difference over every peer, Holm's p."""
    out = []
    for r in rows:
        c = r["composition"]
        mix = " / ".join(str(c.get(k, 0)) for k in ("clean", "corruption", "attack", "foreign"))
        cells = [r["stream"], mix, _ci_text(r["trust"], r["trust_ci95"]),
                 f"{r['best_peer']} {_ci_text(r['peer'], r['peer_ci95'])}",
                 _diff_text(r["diff"], r["diff_ci95"]), f"{r['largest_upper_bound']:+.3f}",
                 "yes" if r["lowest_everywhere"] else "no", f"{r['p_not_lowest_holm']:.3f}"]
        out.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells)
                   + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in (
        "traffic", "clean / corrupted / attacked / foreign", "trust AURC [95% CI]",
        "lowest peer AURC [95% CI]", "trust - lowest peer [95% CI]",
        "largest upper bound over every peer", "lower than every peer", "Holm p"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(out)}</tbody></table>"


def _rate(r: dict | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    lo, hi = r["ci95"]
    return f"{100 * r['value']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}] (n={r['n']})"


def fault_injection_html(metrics: dict) -> str:
    """``conceptguard inject-faults`` (when the bank has it): ``diagnose``'s verdicts scored
    on faults of known location, and the paper's per-input rule beside them."""
    fi = metrics.get("fault_injection")
    if not isinstance(fi, dict) or "summary" not in fi:
        return ""
    s = fi["summary"]
    rows = [[name, f"{b['variants']} ({b['no_measurable_effect']})",
             _rate(b["changed_accuracy"]), b["faulty_pairs"], _rate(b["limit_agreement"]),
             _rate(b["abstain_rate"]), _rate(b["head_limit_recovered_90"]),
             _rate(b["paper_rule_accuracy_vlm"]), _rate(b["paper_rule_accuracy_perfect_oracle"])]
            for name, b in [("all", s), *s["by_kind"].items()]]
    return ("<h2>Debugging measured on injected faults</h2><p class=note>"
            + html.escape(fi["info"]["note"]) + "</p>"
            + _table(rows, ["faults", "variants (no measurable effect)", "changed right",
                            "faulty pairs", "limit agrees with the repair", "abstain",
                            "limit = head: repair recovers >= 90%",
                            "paper rule right (packaged VLM)",
                            "paper rule right (perfect oracle)"]))


def concepts_html(metrics: dict) -> str:
    """The concept competence check and what the concepts named under it are worth."""
    c = metrics.get("concepts")
    if not isinstance(c, dict):
        return ""
    rows = [[k, ", ".join(v["concepts"]),
             f"{v['faithfulness']['ratio']:.2f} [{v['faithfulness']['ratio_ci95'][0]:.2f}, "
             f"{v['faithfulness']['ratio_ci95'][1]:.2f}]",
             "-" if v["plausibility"] is None else
             f"{v['plausibility']['hits']}/{v['plausibility']['named']} "
             f"(chance {v['plausibility']['chance']:.2f})"]
            for k, v in c.get("per_pair", {}).items()]
    head = (f"<p>{c['competent_pairs']} of {c['pairs']} class pairs are competent (both "
            f"views' probe accuracy at least {c['threshold']}); competent classes: "
            f"{html.escape(', '.join(c['competent_classes']) or 'none')}. Faithfulness "
            f"ratio (named vs. random concepts): {_fmt(c['faithfulness_ratio'])}; "
            f"plausibility {_fmt(c['plausibility'])} (chance "
            f"{_fmt(c['plausibility_chance'])}).</p>")
    return ("<h2>Concepts: where the VLM is competent</h2><p class=note>"
            + html.escape(c["note"]) + "</p>" + head
            + _table(rows, ["pair", "named concepts", "faithfulness ratio [95%]",
                            "plausibility"]))


def render_html(manifest: Manifest, metrics: dict, images: list[tuple[str, str]],
                evidence: str | None = None) -> str:
    if evidence is None:
        evidence = ("<section id=curves><p class=note>Curves and example thumbnails need "
                    "per-input scores: run <code>conceptguard report &lt;bank&gt;</code> to "
                    "add them.</p></section>")
    mis = metrics["misclassification"]
    adv_blocks = "".join(
        f"<h3>{html.escape(name)} (successful {sec['successful']} of {sec['attempted']})</h3>"
        + _method_table(sec, ["auroc"], set()) for name, sec in metrics["adversarial"].items())
    shift_rows = [[k, v["n"], _fmt(v["accuracy"]), _fmt(v["accepted_accuracy"]),
                   _fmt(v["coverage_at_threshold"]), _fmt(v["trust"]["auroc"]),
                   f"{v['best_peer']} {v[v['best_peer']]['auroc']:.4f}", str(v["held_out"])]
                  for k, v in metrics.get("shift", {}).items()]
    foreign_rows = [[k, v["n"], _fmt(v["trust"]["auroc"]),
                     f"{v['best_peer']} {v[v['best_peer']]['auroc']:.4f}",
                     _fmt(v["trust"]["detection_rate_at_threshold"]), str(v["held_out"])]
                    for k, v in metrics.get("foreign", {}).items()]
    reason_rows = [[k, v["n"], _fmt(v["precision"])]
                   for k, v in metrics.get("reason_precision", {}).items()]
    fl = metrics.get("fault_localisation", {})
    pair_rows = [[p["true"], p["predicted"], p["count"], p["head"], p["encoder"],
                  p["ambiguous"], ", ".join(f"{c['concept']} ({c['gap']:+.2f})"
                                            for c in p["responsible_concepts"])]
                 for p in fl.get("pairs", [])]
    figs = "".join(f"<figure><img src='{html.escape(f)}' alt='{html.escape(t)}'>"
                   f"<figcaption>{html.escape(t)}</figcaption></figure>" for f, t in images)
    summary = [
        ["classifier test accuracy", _fmt(metrics["classifier"]["test_accuracy"])],
        ["VLM", metrics["vlm"]["id"]],
        ["VLM zero-shot accuracy (test)", _fmt(metrics["vlm"]["zero_shot_accuracy"])],
        ["aligner held-out R²", _fmt(metrics["aligner"]["heldout_r2"])],
        ["aligner held-out cosine", _fmt(metrics["aligner"]["heldout_cosine"])],
        ["threshold", f"{metrics['threshold']['value']:.4f} ({metrics['threshold']['target']})"],
        ["coverage / accepted accuracy",
         f"{metrics['threshold']['coverage']:.4f} / "
         f"{metrics['threshold']['accepted_accuracy']:.4f}"],
    ]
    timings = [[k, f"{v:.1f}"] for k, v in metrics.get("timings_s", {}).items()]
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>conceptguard report: {html.escape(manifest.bank_id)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:right}}td:first-child,th:first-child{{text-align:left}}figure{{margin:1em 0}}
img{{max-width:100%}}.note{{color:#666;font-size:0.9em}}
.verdict{{background:#f4f7fb;border:1px solid #c9d6e6;padding:0.5em 1.2em}}
.thumbs{{display:flex;flex-wrap:wrap;gap:10px}}.thumb{{width:150px;margin:0;font-size:0.8em}}
.thumb img{{image-rendering:pixelated;width:84px;border:1px solid #999}}</style></head><body>
<h1>conceptguard report</h1>
<p>bank <code>{html.escape(manifest.bank_id)}</code>, created {html.escape(manifest.created_at)},
{len(manifest.classes)} classes, {len(manifest.concepts)} concepts
(<code>{html.escape(manifest.concept_set)}</code>).</p>
{verdict_html(metrics)}
{evidence}
{calibration_html(metrics)}
{fault_injection_html(metrics)}
{concepts_html(metrics)}
<h2>Confusion pairs: the paper's per-input rule (a reported mode)</h2>
<p class=note>For what changed, what limits each pair and what fixes it, run
<code>conceptguard diagnose</code>. Below: misclassified test inputs the VLM saw, by
(true, predicted) pair: ambiguous
where the VLM oracle itself does not name the label; otherwise a head fault where the
encoder's features, read through the aligner, still name the true class (the head erred), and
an encoder fault where they do not; responsible concepts: the largest gaps between the
pair's mean concept profile and the true class's correct heatmap.</p>
<p>head: {fl.get('head', 0)}, encoder: {fl.get('encoder', 0)},
ambiguous: {fl.get('ambiguous', 0)}</p>
{_table(pair_rows, ["true", "predicted", "n", "head", "encoder", "ambiguous",
                    "responsible concepts (gap to H_ok[true])"])}
<h2>Summary</h2>{_table(summary, ["figure", "value"])}
<h2>Trust on traffic mixes: risk-coverage</h2>
<p class=note>AURC (lower is better) with 95% intervals from a bootstrap clustered by source
image; the difference is paired (the same resamples); Holm's adjustment across the mixes of
the p-value that trust is not lower than every peer.</p>
{streams_html(metrics.get("summary_streams", []))}
<h2>Heads against the strongest standard detector, per task</h2>
<p class=note>AUROC (higher is better), 95% clustered bootstrap intervals; the comparator is
the standard detector chosen for the task's family on the calibration stream, the best peer
the one that is best on the test data; bold: the best head trails the comparator by more
than 0.005 (the whole interval); Holm's adjustment across tasks.</p>
{summary_html(metrics.get("summary", []))}
<h2>Misclassification detection (clean test: {mis['n']} inputs, {mis['n_wrong']} wrong)</h2>
{_method_table(mis, ["auroc", "fpr_at_95tpr", "aurc"], {"fpr_at_95tpr", "aurc"})}
<p class=note>paper rule decision accuracy: {mis['paper_rule']['decision_accuracy']:.4f}</p>
<h2>Adversarial detection (clean correct vs. successful adversarial)</h2>{adv_blocks}
<h2>Corruptions: wrong vs. right predictions, and the threshold</h2>
{_table(shift_rows, ["corruption", "n", "accuracy (unmonitored)", "accepted accuracy",
                     "coverage", "trust AUROC", "strongest peer AUROC", "held out"])}
<h2>Foreign inputs (vs. clean test inputs)</h2>
{_table(foreign_rows, ["set", "n", "trust AUROC", "strongest peer AUROC",
                       "rejected at threshold", "held out"])}
<h2>Reject reasons on the mixed stream: precision</h2>
{_table(reason_rows, ["reason", "inputs", "precision"])}
<h2>Mixed stream</h2><p>{html.escape(metrics['mixed']['description'])}</p>
{_method_table(metrics['mixed'], ["aurc", "risk_at_90_coverage", "auroc"],
               {"aurc", "risk_at_90_coverage"})}
{compositions_html(metrics)}
<h2>Figures</h2>{figs}
<h2>Timings (s)</h2>{_table(timings, ["stage", "seconds"])}
<p id=images-status class=note>figures: checking…</p>
<script>window.addEventListener("load", function () {{
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  var el = document.getElementById("images-status");
  el.dataset.loaded = ok; el.dataset.total = imgs.length;
  el.textContent = "figures loaded: " + ok + " of " + imgs.length +
    (ok < imgs.length ? " (some are missing: re-render with conceptguard report)" : "");
}});</script>
</body></html>"""


def write_report(folder: Path, manifest: Manifest, tensors: dict[str, np.ndarray],
                 metrics: dict, evidence=None, *, redraw: bool = True) -> list[Path]:
    """Write the PNGs, ``index.html`` and ``metrics.json`` into ``folder``. With
    ``evidence`` (:func:`offline.report_evidence.compute_evidence`), also the curves,
    the reliability diagram and the example thumbnails. ``redraw=False`` keeps the heatmap,
    estimation and AUROC figures already in ``folder`` (drawn from the same tensors and
    metrics by the build a moment before) instead of drawing them again."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("ex_*.png"):  # thumbnails of an earlier rendering
        old.unlink()
    written: list[Path] = []
    ev_html = None
    if evidence is not None:
        ev_html, ev_written = evidence_html(folder, manifest, metrics, evidence)
        written += ev_written
    images: list[tuple[str, str]] = []
    for key, title, cmap in HEATMAP_FIGURES:
        if key not in tensors:
            continue
        name = key.replace("heatmaps.", "").replace(".", "_") + ".png"
        if redraw or not (folder / name).is_file():
            heatmap_png(tensors[key], manifest.classes, manifest.concept_names, title,
                        folder / name, cmap)
        images.append((name, title))
        written.append(folder / name)
    if isinstance(metrics.get("trust_calibration"), dict):
        if redraw or not (folder / ESTIMATION_FIGURE).is_file():
            estimation_png(metrics["trust_calibration"], folder / ESTIMATION_FIGURE)
        written.append(folder / ESTIMATION_FIGURE)
    if redraw or not (folder / "auroc.png").is_file():
        bar_png(metrics, folder / "auroc.png")
    images.insert(0, ("auroc.png", "detection AUROC per method and task"))
    written.append(folder / "auroc.png")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    page = render_html(manifest, metrics, images, ev_html)
    if (folder / "diagnosis" / "diagnosis.html").is_file():  # conceptguard diagnose --out
        page = page.replace("<h2>Debugging measured on injected faults</h2>",
                            "<p>The bank classifier's own confusions: "
                            "<a href='diagnosis/diagnosis.html'>diagnosis</a> "
                            "(<code>conceptguard diagnose</code>).</p>"
                            "<h2>Debugging measured on injected faults</h2>", 1)
    (folder / "index.html").write_text(page)
    return [*written, folder / "metrics.json", folder / "index.html"]


# --- the page a person reads first: verdict, curves, reliability, examples ------------------

CURVE_METHODS: tuple[str, ...] = ("trust", "msp", "doctor", "energy", "mahalanobis", "knn",
                                  "vim", "paper_rule")


def verdict_html(metrics: dict) -> str:
    """Accuracy, coverage at the threshold, trust on every traffic mix (risk-coverage) and
    each task's best head against its comparator, with intervals."""
    th = metrics["threshold"]
    acc = metrics["classifier"]["test_accuracy"]
    lowest, not_lowest = [], []
    for r in metrics.get("summary_streams", []):
        text = (f"{html.escape(r['stream'])}: trust AURC "
                f"{html.escape(_ci_text(r['trust'], r['trust_ci95']))} vs "
                f"{html.escape(r['best_peer'])} "
                f"{html.escape(_ci_text(r['peer'], r['peer_ci95']))}; difference "
                f"{html.escape(_diff_text(r['diff'], r['diff_ci95']))}")
        (lowest if r["lowest_everywhere"] else not_lowest).append(text)
    match, behind, unclear = [], [], []
    for r in metrics.get("summary", []):
        if "best_head" not in r:
            continue
        ci = r["head_vs_comparator_ci95"]
        text = (f"{html.escape(r['task'])}: {HEAD_SHORT[r['best_head']]} head "
                f"{html.escape(_ci_text(r['best_head_auroc'], r['best_head_ci95']))} vs "
                f"{html.escape(r['comparator'])} "
                f"{html.escape(_ci_text(r['comparator_auroc'], r['comparator_ci95']))} "
                f"({html.escape(_diff_text(r['head_vs_comparator'], ci))})")
        if r["p_head_behind_holm"] < 0.05:
            match.append(text)
        elif ci[1] < -0.005:
            behind.append(text)
        else:
            unclear.append(text)

    def items(xs: list[str]) -> str:
        return "<ul>" + "".join(f"<li>{x}</li>" for x in xs) + "</ul>" if xs else "<p>none</p>"

    mixed = metrics.get("mixed", {}).get("trust", {})
    mixed_line = ""
    if "coverage_at_threshold" in mixed:
        mixed_line = (f"<li>on the mixed stream (clean, corrupted, attacked, foreign) the "
                      f"threshold accepts {mixed['coverage_at_threshold']:.1%} of inputs with "
                      f"an error rate of {mixed['risk_at_threshold']:.1%} among them "
                      f"(unmonitored: {metrics['mixed']['error_rate']:.1%}).</li>")
    return f"""<section id=verdict class=verdict><h2>Verdict</h2><ul>
<li>classifier accuracy on the clean test split: <b>{acc:.2%}</b>.</li>
<li>at the threshold (trust &lt; {th['value']:.3f} is rejected; target: {html.escape(th['target'])})
the monitor accepts <b>{th['coverage']:.1%}</b> of clean test inputs, and
<b>{th['accepted_accuracy']:.2%}</b> of those are right; it rejects
{th['reject_rate_wrong']:.1%} of the wrong predictions and {1 - th['accept_rate_correct']:.1%}
of the right ones.</li>{mixed_line}</ul>
<p><code>trust</code> is claimed as a ranking of whatever arrives: risk-coverage (AURC) on
realistic traffic mixes, against every standard detector (paired intervals, clustered by
source image).</p>
<h3>trust lower than every peer, interval of each difference below 0 ({len(lowest)})</h3>
{items(lowest)}
<h3>not shown lower than every peer ({len(not_lowest)})</h3>{items(not_lowest)}
<p>Each task is claimed by a head: the best head against the standard detector chosen for the
task's family on the calibration stream.</p>
<h3>a head matches the comparator within 0.005 (Holm-adjusted p &lt; 0.05) ({len(match)})</h3>
{items(match)}
<h3>the best head trails by more than 0.005 (whole interval) ({len(behind)})</h3>{items(behind)}
<h3>not decided ({len(unclear)})</h3>{items(unclear)}</section>"""


def roc_png(panels: list[tuple[str, dict[str, np.ndarray], np.ndarray]], path: Path) -> None:
    """ROC curves of trust against the peers, one panel per task (positive = defect)."""
    from conceptguard.metrics import auroc

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5), dpi=100,
                             squeeze=False)
    for ax, (title, risks, positive) in zip(axes[0], panels, strict=True):
        pos = np.asarray(positive, bool)
        for m in CURVE_METHODS:
            if m not in risks:
                continue
            r = np.asarray(risks[m], np.float64)
            order = np.argsort(-r, kind="mergesort")
            tpr = np.concatenate([[0], np.cumsum(pos[order]) / max(1, pos.sum())])
            fpr = np.concatenate([[0], np.cumsum(~pos[order]) / max(1, (~pos).sum())])
            ax.plot(fpr, tpr, lw=2.4 if m == "trust" else 1.1,
                    label=f"{m} ({auroc(r, pos):.3f})", color="black" if m == "trust" else None)
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{title}\n({int(pos.sum())} defects, {int((~pos).sum())} others)",
                     fontsize=10)
        ax.legend(fontsize=7, loc="lower right", title="AUROC", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def risk_coverage_png(panels: list[tuple[str, dict[str, np.ndarray], np.ndarray, float | None]],
                      path: Path) -> None:
    """Selective risk against coverage (accept the least risky first); trust's operating
    point at the bank's threshold marked."""
    from conceptguard.metrics import aurc, risk_coverage

    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 5), dpi=100,
                             squeeze=False)
    for ax, (title, risks, error, threshold) in zip(axes[0], panels, strict=True):
        err = np.asarray(error, np.float64)
        for m in CURVE_METHODS:
            if m not in risks:
                continue
            cov, risk = risk_coverage(risks[m], err)
            ax.plot(cov, risk, lw=2.4 if m == "trust" else 1.1,
                    label=f"{m} ({aurc(risks[m], err):.4f})",
                    color="black" if m == "trust" else None)
        if threshold is not None and "trust" in risks:
            acc = risks["trust"] <= 1.0 - threshold
            if acc.any():
                ax.plot([acc.mean()], [err[acc].mean()], "o", ms=9, mfc="none", mec="red",
                        mew=2, label=f"trust at threshold ({acc.mean():.1%} accepted)")
        ax.set_xlabel("coverage (fraction accepted)")
        ax.set_ylabel("risk (error rate among accepted)")
        ax.set_title(f"{title}\n(unmonitored error {err.mean():.1%}, n={len(err)})", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", title="AURC (lower is better)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reliability_png(panels: list[tuple[str, np.ndarray, np.ndarray]], path: Path,
                    bins: int = 10) -> list[float]:
    """Reliability diagram of trust (an estimate of P(right)); returns each panel's ECE."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), dpi=100,
                             squeeze=False)
    eces = []
    for ax, (title, trust, right) in zip(axes[0], panels, strict=True):
        t = np.clip(np.asarray(trust, np.float64), 0, 1)
        y = np.asarray(right, np.float64)
        idx = np.minimum((t * bins).astype(int), bins - 1)
        centers, freq, counts, conf = [], [], [], []
        for b in range(bins):
            sel = idx == b
            if sel.any():
                centers.append((b + 0.5) / bins)
                conf.append(t[sel].mean())
                freq.append(y[sel].mean())
                counts.append(int(sel.sum()))
        ece = float(sum(c * abs(f - p) for c, f, p in zip(counts, freq, conf, strict=True))
                    / max(1, len(t)))
        eces.append(ece)
        ax.bar(centers, freq, width=1 / bins * 0.9, color="#7aa6d6", edgecolor="#355",
               label="fraction right")
        ax.plot(conf, freq, "o-", color="black", ms=4, label="mean trust vs. fraction right")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        for c, f, n in zip(centers, freq, counts, strict=True):
            ax.text(c, min(f + 0.02, 0.97), str(n), ha="center", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("trust")
        ax.set_ylabel("fraction of predictions that are right")
        ax.set_title(f"{title}\n(ECE {ece:.3f}; numbers: inputs per bin)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return eces


def thumbnail_png(image: np.ndarray, path: Path, scale: int = 3) -> None:
    from PIL import Image

    img = np.asarray(image, np.uint8)
    img = img[..., 0] if img.shape[-1] == 1 else img
    pil = Image.fromarray(img)
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)


def _pick(n: int, mask: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Up to ``n`` indices where ``mask`` holds, the lowest ``key`` first."""
    idx = np.flatnonzero(mask)
    return idx[np.argsort(key[idx], kind="mergesort")][:n]


def examples_html(folder: Path, ev, manifest: Manifest, per_kind: int = 8
                  ) -> tuple[str, list[Path]]:
    """Thumbnails (misclassified, rejected, adversarial, foreign), each with the prediction,
    trust, the decision, its reason kind and the concepts behind it."""
    from conceptguard.scoring import top_reasons

    names, classes = manifest.concept_names, manifest.classes
    written: list[Path] = []
    blocks = []
    clean = ev.clean
    s = clean.scores
    kinds = [
        ("misclassified", "clean test inputs the classifier gets wrong, most trusted first "
         "(the hardest cases for the monitor)", clean, _pick(per_kind, clean.defect, -s.trust)),
        ("rejected", "clean test inputs the monitor rejects, least trusted first", clean,
         _pick(per_kind, s.reject, s.trust)),
    ]
    for g, what in ((ev.adversarial, "successful PGD attacks"),
                    (ev.foreign, "foreign images (not clothing)"),
                    (ev.corrupted, "corrupted test inputs the classifier gets wrong")):
        if g is not None and len(g.labels):
            rng = np.random.default_rng(0)
            order = rng.permutation(len(g.labels))
            mask = g.defect if g.name != "corrupted" else g.scores.predictions != g.labels
            pick = np.array([i for i in order if mask[i]][:per_kind], dtype=int)
            kinds.append((g.name, what, g, pick))
    for kind, what, g, pick in kinds:
        cards = []
        sc = g.row_scores(pick)  # full scores (concept contributions) of the picked rows
        for j, i in enumerate(pick.tolist()):
            name = f"ex_{kind}_{j}.png"
            thumbnail_png(g.images[i], folder / name)
            written.append(folder / name)
            pred = classes[int(sc.predictions[j])]
            true = classes[int(g.labels[i])] if g.labels[i] >= 0 else "(foreign)"
            reasons = ", ".join(f"{c} {v:+.2f}"
                                for c, v in top_reasons(sc.contributions[j], names, 3))
            verdict = f"rejected: {sc.reason[j]}" if sc.reject[j] else "accepted"
            cards.append(
                f"<figure class=thumb><img src='{name}' alt='{html.escape(kind)} example'>"
                f"<figcaption>predicted <b>{html.escape(pred)}</b><br>true "
                f"{html.escape(true)}<br>trust {sc.trust[j]:.2f}, "
                f"{html.escape(verdict)}<br><span class=note>concepts: "
                f"{html.escape(reasons)}</span></figcaption></figure>")
        blocks.append(f"<h3>{html.escape(kind)}</h3><p class=note>{html.escape(what)}</p>"
                      f"<div class=thumbs>{''.join(cards) or '<p>none</p>'}</div>")
    return "".join(blocks), written


def evidence_html(folder: Path, manifest: Manifest, metrics: dict, ev) -> tuple[str, list[Path]]:
    """Curves, reliability and examples from the regenerated per-input evidence."""
    threshold = float(metrics["threshold"]["value"])
    written: list[Path] = []
    c = ev.clean
    roc_panels = [("misclassification (clean test)", c.risks, c.defect)]
    if ev.adversarial is not None and len(ev.adversarial.labels):
        right = ~c.defect
        r = {m: np.concatenate([c.risks[m][right], ev.adversarial.risks[m]]) for m in c.risks}
        pos = np.concatenate([np.zeros(int(right.sum()), bool),
                              np.ones(len(ev.adversarial.labels), bool)])
        roc_panels.append(("adversarial (PGD) vs. clean correct", r, pos))
    if ev.foreign is not None:
        r = {m: np.concatenate([c.risks[m], ev.foreign.risks[m]]) for m in c.risks}
        pos = np.concatenate([np.zeros(len(c.labels), bool), np.ones(len(ev.foreign.labels), bool)])
        roc_panels.append(("foreign vs. clean test", r, pos))
    roc_png(roc_panels, folder / "roc.png")
    written.append(folder / "roc.png")

    rc_panels = [("clean test", c.risks, c.defect, threshold)]
    groups = [g for g in (c, ev.corrupted, ev.adversarial, ev.foreign) if g is not None]
    mixed_note = ""
    if len(groups) > 1:
        mr = {m: np.concatenate([g.risks[m] for g in groups]) for m in c.risks}
        me = np.concatenate([g.defect for g in groups])
        rc_panels.append(("mixed: clean + corrupted + attacked + foreign", mr, me, threshold))
        mixed_note = ("; the mixed panel pools every input below (an error is a wrong "
                      "prediction, a successful attack or a foreign input)")
    risk_coverage_png(rc_panels, folder / "risk_coverage.png")
    written.append(folder / "risk_coverage.png")

    rel_panels = [("trust on the clean test split", c.scores.trust, ~c.defect)]
    if ev.corrupted is not None:
        rel_panels.append(("trust on corrupted test inputs", ev.corrupted.scores.trust,
                           ~ev.corrupted.defect))
    eces = reliability_png(rel_panels, folder / "reliability.png")
    written.append(folder / "reliability.png")

    ex, ex_written = examples_html(folder, ev, manifest)
    written += ex_written
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in ev.notes)
    acc_here = float((~c.defect).mean())
    same = abs(acc_here - metrics["classifier"]["test_accuracy"]) < 5e-4
    match = ", the same split and graph" if same else ", WARNING: they differ"
    body = f"""<section id=curves><h2>Curves: trust against the peers</h2>
<p class=note>Regenerated when the report is rendered: the bank's ONNX graph scores these
inputs exactly as the service would (classifier accuracy here {acc_here:.2%}; metrics.json:
{metrics['classifier']['test_accuracy']:.2%}{match}):</p>
<ul class=note>{notes}</ul>
<figure><img src='roc.png' alt='ROC curves'><figcaption>ROC curves (a defect is a wrong
prediction, a successful attack or a foreign input; legend: AUROC)</figcaption></figure>
<figure><img src='risk_coverage.png' alt='risk-coverage curves'><figcaption>risk-coverage
curves: accept the least risky inputs first; red circle: trust at the bank's
threshold{mixed_note}</figcaption></figure>
<figure><img src='reliability.png' alt='reliability diagram of trust'><figcaption>reliability
of trust as P(prediction is right): ECE {', '.join(f'{e:.3f}' for e in eces)}
</figcaption></figure></section>
<section id=examples><h2>Examples, with the concepts behind each decision</h2>
<p class=note>concepts: the three largest signed terms of cos(s, H_ok) - cos(s, H_bad/adv)
for the predicted class; negative terms pulled the input towards the defect profile.</p>
{ex}</section>"""
    return body, written
