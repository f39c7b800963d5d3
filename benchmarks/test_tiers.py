"""Wall time of the two test tiers on this machine: the fast tier (``scripts/test.sh
--fast``, ``pytest -m "not slow"``) and the whole suite (``scripts/test.sh``), run one after
the other through scripts/test.sh in this checkout with its .venv (set up first, so install
time is not counted), on the pytest-xdist workers it uses (CONCEPTGUARD_TEST_WORKERS,
default 2).
The load average is recorded: on a shared machine the times grow.

    .venv/bin/python benchmarks/test_tiers.py [--tier fast|full|both]
    BENCH_RESULT=benchmarks/results/test-tiers.json .venv/bin/python benchmarks/test_tiers.py
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIERS = {"fast": ["--fast"], "full": []}
GOALS_S = {"fast": 90, "full": 360}


def workers() -> int:
    return int(os.environ.get("CONCEPTGUARD_TEST_WORKERS", "2"))


def run_tier(name: str) -> dict:
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    # the README's command itself (its set-up check finds the set installed: a second)
    r = subprocess.run(["bash", "scripts/test.sh", *TIERS[name], "-p", "no:cacheprovider"],
                       cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - start
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)",
                                              tail)}
    failures = [line.split(" - ")[0] for line in r.stdout.splitlines()
                if line.startswith(("FAILED ", "ERROR "))]
    return {"tier": name, "workers": workers(), "seconds": round(wall, 1),
            "exit_code": r.returncode,
            "summary": tail.strip("= "), **counts, "failures": failures,
            "goal_seconds": GOALS_S[name],
            "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tier", choices=["fast", "full", "both"], default="both")
    args = ap.parse_args()
    from _common import emit, machine

    names = ["fast", "full"] if args.tier == "both" else [args.tier]
    emit("test_tiers", {**machine(), "tiers": {n: run_tier(n) for n in names}})


if __name__ == "__main__":
    main()
