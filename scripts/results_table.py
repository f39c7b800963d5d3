"""Print the README's results tables (markdown) from a bank's report/metrics.json, so the
README shows what the bank holds: python scripts/results_table.py banks/demo
(``scripts/docs.py`` writes the same tables into the README's generated regions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _ci(v: float, ci: list[float]) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def load_metrics(bank: str | Path) -> dict[str, Any]:
    return json.loads((Path(bank) / "report" / "metrics.json").read_text())


def summary_table(m: dict[str, Any]) -> str:
    """Per task: trust, the strongest standard peer, and trust's margin over it, signed so
    that + always means trust is better (AUROC: trust - peer; AURC, lower is better:
    peer - trust)."""
    lines = ["| task | trust [95% CI] | strongest standard peer [95% CI] | "
             "margin, + = trust better [95% CI] |", "|---|---|---|---|"]
    for r in m["summary"]:
        sign = -1.0 if r["metric"] == "aurc" else 1.0
        margin = f"{sign * r['margin']:+.3f}"
        if r.get("margin_ci95"):
            lo, hi = sorted(sign * x for x in r["margin_ci95"])
            margin += f" [{lo:+.3f}, {hi:+.3f}]"
        name = r["task"] + (" (AURC, lower is better)" if r["metric"] == "aurc" else "")
        lines.append(f"| {name} | {_ci(r['trust'], r['trust_ci95'])} | {r['best_peer']} "
                     f"{_ci(r['peer'], r['peer_ci95'])} | {margin} |")
    return "\n".join(lines) + "\n"


def shift_table(m: dict[str, Any]) -> str:
    lines = ["| corruption | accuracy, unmonitored | accepted accuracy | coverage |",
             "|---|---|---|---|"]
    for k, v in m["shift"].items():
        acc = "-" if v["accepted_accuracy"] is None else f"{v['accepted_accuracy']:.3f}"
        lines.append(f"| {k} | {v['accuracy']:.3f} | {acc} | {v['coverage_at_threshold']:.3f} |")
    return "\n".join(lines) + "\n"


def reasons_table(m: dict[str, Any]) -> str:
    lines = ["| reject reason (mixed stream) | inputs | precision |", "|---|---|---|"]
    for k, v in m["reason_precision"].items():
        lines.append(f"| {k} | {v['n']} | {v['precision']:.3f} |")
    return "\n".join(lines) + "\n"


def main(bank: str) -> None:
    m = load_metrics(bank)
    print(summary_table(m))
    print(shift_table(m))
    print(reasons_table(m), end="")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "banks/demo")
