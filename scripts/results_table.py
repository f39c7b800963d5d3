"""The README's results tables (markdown) from a bank's report/metrics.json:
``python scripts/results_table.py banks/demo`` prints them; ``scripts/docs.py`` writes them
into the README's generated blocks (``summary_table``, ``streams_table``, ``shift_table``,
``reasons_table``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEAD_SHORT = {"head_misclassification": "mis", "head_anomaly": "anom",
              "head_adversarial": "adv", "head_unfamiliar": "unf"}


def _ci(v: float, ci: list[float]) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _diff(v: float, ci: list[float] | None) -> str:
    return f"{v:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def _head_rows(m: dict) -> list[str]:
    out = ["| task | comparator (chosen on calibration) | best peer on test | trust | "
           "heads: mis / anom / adv / unf | best head - comparator | best head - best peer | "
           "Holm p (head behind by >= 0.005) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in m["summary"]:
        heads = " / ".join(f"{r['heads'][h]:.3f}" for h in HEAD_SHORT if h in r["heads"])
        out.append(
            f"| {r['task']} | {r['comparator']} {_ci(r['comparator_auroc'], r['comparator_ci95'])}"
            f" | {r['best_peer']} {_ci(r['peer'], r['peer_ci95'])} | "
            f"{_ci(r['trust'], r['trust_ci95'])} | {heads} | "
            f"{HEAD_SHORT[r['best_head']]} "
            f"{_diff(r['head_vs_comparator'], r['head_vs_comparator_ci95'])} | "
            f"{_diff(r['head_vs_best_peer'], r['head_vs_best_peer_ci95'])} | "
            f"{r['p_head_behind_holm']:.3f} |")
    return out


def _stream_rows(m: dict) -> list[str]:
    out = ["| traffic | clean / corrupted / attacked / foreign | trust AURC | lowest peer AURC | "
           "trust - lowest peer | largest upper bound over all peers | lower than every peer "
           "(interval < 0) | Holm p |",
           "|---|---|---|---|---|---|---|---|"]
    for r in m["summary_streams"]:
        c = r["composition"]
        mix = " / ".join(str(c.get(k, 0)) for k in ("clean", "corruption", "attack", "foreign"))
        out.append(
            f"| {r['stream']} | {mix} | {_ci(r['trust'], r['trust_ci95'])} | {r['best_peer']} "
            f"{_ci(r['peer'], r['peer_ci95'])} | {_diff(r['diff'], r['diff_ci95'])} | "
            f"{r['largest_upper_bound']:+.3f} | {'yes' if r['lowest_everywhere'] else 'no'} | "
            f"{r['p_not_lowest_holm']:.3f} |")
    return out


def _reason_rows(m: dict) -> list[str]:
    streams = {"mixed stream": m["mixed"]}
    streams.update({k: v for k, v in m.get("mixed_compositions", {}).items()})
    kinds = list(m["reason_precision"])
    out = ["| reject reason | " + " | ".join(streams) + " |",
           "|---|" + "---|" * len(streams)]
    for k in kinds:
        cells = []
        for sec in streams.values():
            v = sec["reason_precision"][k]
            cells.append("-" if v["precision"] is None else f"{v['precision']:.3f} (n={v['n']})")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return out


def load_metrics(bank: str | Path) -> dict[str, Any]:
    return json.loads((Path(bank) / "report" / "metrics.json").read_text())


def summary_table(m: dict[str, Any]) -> str:
    """Per task: the comparator chosen on the calibration stream, the best peer on test,
    trust, every head, and the best head's paired margins (+ = the head is better)."""
    return "\n".join(_head_rows(m)) + "\n"


def streams_table(m: dict[str, Any]) -> str:
    """Trust's AURC on the mixed stream and the compositions against every peer."""
    return "\n".join(_stream_rows(m)) + "\n"


def shift_table(m: dict[str, Any]) -> str:
    lines = ["| corruption | accuracy, unmonitored | accepted accuracy | coverage |",
             "|---|---|---|---|"]
    for k, v in m["shift"].items():
        acc = "-" if v["accepted_accuracy"] is None else f"{v['accepted_accuracy']:.3f}"
        lines.append(f"| {k} | {v['accuracy']:.3f} | {acc} | {v['coverage_at_threshold']:.3f} |")
    return "\n".join(lines) + "\n"


def reasons_table(m: dict[str, Any]) -> str:
    """Reason precision on the mixed stream and every composition."""
    return "\n".join(_reason_rows(m)) + "\n"


def main(bank: str) -> None:
    m = load_metrics(bank)
    print("\n".join([summary_table(m), streams_table(m), shift_table(m), reasons_table(m)]),
          end="")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "banks/demo")
