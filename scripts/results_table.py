"""Print the README's results tables (markdown) from a bank's report/metrics.json, so the
README shows what the bank holds: python scripts/results_table.py banks/demo"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ci(v: float, ci: list[float]) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def main(bank: str) -> None:
    m = json.loads((Path(bank) / "report" / "metrics.json").read_text())
    print("| task | trust [95% CI] | strongest standard peer [95% CI] | margin [95% CI] |")
    print("|---|---|---|---|")
    for r in m["summary"]:
        margin = f"{r['margin']:+.3f}"
        if r.get("margin_ci95"):
            lo, hi = r["margin_ci95"]
            margin += f" [{lo:+.3f}, {hi:+.3f}]"
        name = r["task"] + (" (AURC, lower is better)" if r["metric"] == "aurc" else "")
        print(f"| {name} | {_ci(r['trust'], r['trust_ci95'])} | {r['best_peer']} "
              f"{_ci(r['peer'], r['peer_ci95'])} | {margin} |")
    print()
    print("| corruption | accuracy, unmonitored | accepted accuracy | coverage |")
    print("|---|---|---|---|")
    for k, v in m["shift"].items():
        acc = "-" if v["accepted_accuracy"] is None else f"{v['accepted_accuracy']:.3f}"
        print(f"| {k} | {v['accuracy']:.3f} | {acc} | {v['coverage_at_threshold']:.3f} |")
    print()
    print("| reject reason (mixed stream) | inputs | precision |")
    print("|---|---|---|")
    for k, v in m["reason_precision"].items():
        print(f"| {k} | {v['n']} | {v['precision']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "banks/demo")
