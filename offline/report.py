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
    methods = [m for m, v in section.items() if isinstance(v, dict) and keys[0] in v]
    rows = [[m, *[_fmt(section[m].get(k, "")) for k in keys]] for m in methods]
    return _table(rows, ["method", *keys]) + (
        f"<p class=note>lower is better: {', '.join(sorted(best_low))}</p>" if best_low else "")


def _ci_text(v: float, ci: list[float] | None) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def summary_html(rows: list[dict]) -> str:
    """Per task: trust against the strongest standard detector, intervals, the margin; the
    better of the two in bold (neither where the margin's interval straddles 0)."""
    out = []
    for r in rows:
        lower_better = r["metric"] == "aurc"
        margin = r["margin"]
        ci = r.get("margin_ci95")
        if ci is not None:
            decided = ci[0] > 0 or ci[1] < 0
        else:  # AURC: the two intervals must not overlap
            a, b = r["trust_ci95"], r["peer_ci95"]
            decided = a[1] < b[0] or b[1] < a[0]
        trust_wins = (margin < 0) if lower_better else (margin > 0)
        t = html.escape(_ci_text(r["trust"], r["trust_ci95"]))
        p = html.escape(_ci_text(r["peer"], r["peer_ci95"]))
        if decided:
            t, p = (f"<b>{t}</b>", p) if trust_wins else (t, f"<b>{p}</b>")
        m = html.escape(f"{margin:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))
        held = r.get("held_out")
        out.append(f"<tr><td>{html.escape(r['task'])}</td><td>{r['metric'].upper()}</td>"
                   f"<td>{t}</td><td>{html.escape(r['best_peer'])}</td><td>{p}</td>"
                   f"<td>{m}</td><td>{html.escape(str(held))}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("task", "metric", "trust [95% CI]",
                                             "strongest peer", "peer [95% CI]",
                                             "margin [95% CI]", "held out"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(out)}</tbody></table>"


def render_html(manifest: Manifest, metrics: dict, images: list[tuple[str, str]]) -> str:
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
img{{max-width:100%}}.note{{color:#666;font-size:0.9em}}</style></head><body>
<h1>conceptguard report</h1>
<p>bank <code>{html.escape(manifest.bank_id)}</code>, created {html.escape(manifest.created_at)},
{len(manifest.classes)} classes, {len(manifest.concepts)} concepts
(<code>{html.escape(manifest.concept_set)}</code>).</p>
<h2>Summary</h2>{_table(summary, ["figure", "value"])}
<h2>Trust against the strongest standard detector, per task</h2>
<p class=note>AUROC (higher is better) or, for the mixed stream, AURC (lower is better);
95% bootstrap intervals; bold where the margin's interval excludes 0.</p>
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
<h2>Fault localisation (misclassified test inputs the VLM saw)</h2>
<p>head: {fl.get('head', 0)}, encoder: {fl.get('encoder', 0)},
ambiguous (the VLM oracle disagrees with the label): {fl.get('ambiguous', 0)}</p>
{_table(pair_rows, ["true", "predicted", "n", "head", "encoder", "ambiguous",
                    "responsible concepts (gap to H_ok[true])"])}
<h2>Figures</h2>{figs}
<h2>Timings (s)</h2>{_table(timings, ["stage", "seconds"])}
</body></html>"""


def write_report(folder: Path, manifest: Manifest, tensors: dict[str, np.ndarray],
                 metrics: dict) -> list[Path]:
    """Write the PNGs, ``index.html`` and ``metrics.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    images: list[tuple[str, str]] = []
    for key, title, cmap in HEATMAP_FIGURES:
        if key not in tensors:
            continue
        name = key.replace("heatmaps.", "").replace(".", "_") + ".png"
        heatmap_png(tensors[key], manifest.classes, manifest.concept_names, title,
                    folder / name, cmap)
        images.append((name, title))
        written.append(folder / name)
    bar_png(metrics, folder / "auroc.png")
    images.insert(0, ("auroc.png", "detection AUROC per method and task"))
    written.append(folder / "auroc.png")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (folder / "index.html").write_text(render_html(manifest, metrics, images))
    return [*written, folder / "metrics.json", folder / "index.html"]
