"""The report's calibration section: ECE of trust per traffic kind, the reject target on
held-out data, and each stream's estimated accuracy (mean calibrated trust) against its
realised accuracy, beside NannyML's CBPE (``metrics.json``'s ``trust_calibration``)."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

FIGURE = "estimated_accuracy.png"
ACCURACY_GOAL = {"clean": 0.03, "shift": 0.10}  # |estimated - realised| goals


def _f(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("–" if x is None else str(x))


def _table(rows: list[list[object]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_f(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def estimation_png(section: dict, path: Path) -> None:
    """Realised accuracy, trust's estimate and CBPE's, per stream."""
    rows = section["estimated_accuracy"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(names)), 4.4), dpi=110)
    x = np.arange(len(names))
    width = 0.27
    ax.bar(x - width, [rows[n]["realised"] for n in names], width, label="realised",
           color="#444")
    ax.bar(x, [rows[n]["estimated"] for n in names], width, label="trust (mean)",
           color="#3b7dd8")
    ax.bar(x + width, [rows[n].get("cbpe", np.nan) for n in names], width,
           label="NannyML CBPE", color="#e39b2d")
    ax.set_xticks(x, labels=names, fontsize=8, rotation=40, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy of the stream")
    ax.legend(fontsize=8)
    ax.set_title("estimated vs. realised accuracy per test stream")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def calibration_html(metrics: dict) -> str:
    sec = metrics.get("trust_calibration")
    if not isinstance(sec, dict):
        return ""
    ece_rows = [[k, v.get("calibrated"), v.get("raw"), v.get("n")]
                for k, v in sec["ece"].items() if k != "fitting_stream_by_kind" and v]
    chk = sec["reject_target_heldout"]
    cbpe = sec.get("cbpe", {})
    cbpe_note = (f"NannyML {html.escape(str(cbpe['version']))} CBPE fitted on "
                 f"{html.escape(str(cbpe.get('fitted_on', '')))}" if "version" in cbpe else
                 f"CBPE: {html.escape(str(cbpe.get('unavailable', 'not run')))}")
    fitted_map = metrics.get("calibration", {}).get("trust_map", {})
    selection = fitted_map.get("clean_share_selection") or {}
    share_html = "" if not selection else (
        f"<p class=note>The calibration map is fitted on the fitting stream's weights blended "
        f"with its clean inputs alone; the clean share "
        f"{html.escape(str(fitted_map.get('clean_share')))} was chosen by cross-fitting, for "
        f"the smaller worse ECE of the two below (on the calibration split: the stream's "
        f"clean inputs, and the whole weighted stream).</p>"
        + _table([[k, v.get("ece_clean"), v.get("ece_stream")] for k, v in selection.items()],
                 ["clean share", "ECE, clean inputs", "ECE, stream"]))
    acc_rows = [[k, v["n"], v["realised"], v["estimated"], v["error"], v.get("cbpe"),
                 v.get("cbpe_error"), v.get("estimated_raw")]
                for k, v in sec["estimated_accuracy"].items()]
    return f"""<section id=calibration><h2>Trust as P(right): calibration and estimated
accuracy</h2>
<p class=note>ECE over {sec.get('ece_bins', 10)} equal-width bins of trust. Test sets are
scored by the monitor that never saw their family; the fitting stream's figure is
cross-fitted (the map fitted on the other folds' out-of-fold scores) and weighted as the
stream is. raw: the trust model's score before the calibration map.</p>
{_table(ece_rows, ["traffic kind", "ECE (calibrated)", "ECE (raw)", "n"])}
{share_html}
<p>Reject target on held-out data: {html.escape(chk['what'])} {chk['measured']:.4f}
(95% bootstrap interval {chk['ci95'][0]:.4f} to {chk['ci95'][1]:.4f}, n={chk['n']}) against
the target {chk['target_value']} ({html.escape(chk['target'])}):
{'met' if chk['met'] else 'NOT met'}.</p>
<p class=note>Estimated accuracy: the mean calibrated trust over a stream, without labels;
error = estimated - realised. Goals: within {ACCURACY_GOAL['clean']} on clean data and within
{ACCURACY_GOAL['shift']} under each shift. {cbpe_note}. {html.escape(sec.get('note', ''))}.</p>
<figure><img src='{FIGURE}' alt='estimated vs realised accuracy'><figcaption>realised
accuracy, trust's estimate and CBPE's per test stream</figcaption></figure>
{_table(acc_rows, ["stream", "n", "realised", "trust estimate", "error", "CBPE",
                   "CBPE error", "raw trust mean"])}
</section>"""
