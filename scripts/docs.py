"""Fill the generated parts of README.md and docs/*.md from their sources, or check them.

Every figure and sample answer in the docs comes from a file: the shipped bank's
``report/metrics.json``, a benchmark's result file in ``benchmarks/results/`` (which records
the command and date that produced it), or the shipped bank served in-process. Two kinds of
marker, invisible in rendered markdown:

* a block, on lines of its own::

      <!-- generated: NAME -->
      ...written by this script...
      <!-- /generated -->

  NAME is a block generator below (``BLOCKS``), e.g. ``results-summary`` or
  ``classify-sample``, or ``bench:FILE`` (a result file's table with its command and date).
* a value inside a sentence: ``<!-- value: SOURCE:PATH FORMAT -->90.8%<!-- /value -->``,
  SOURCE ``metrics`` (the demo bank's metrics.json) or a result file's name without
  ``.json``, PATH dotted keys (list items by index), FORMAT a Python format spec (``.1%``,
  ``.3f``, ``,d``; default ``g``). ``calc:NAME`` takes a derived value (``CALC`` below).

    python scripts/docs.py --write   # rewrite every generated part
    python scripts/docs.py --check   # exit 1, naming each stale part, if any differs
    python scripts/docs.py --list    # every marker and its source

tests/test_docs.py runs ``--check``: a doc that drifts from its source fails the suite.
After a bank rebuild or a benchmark rerun, run ``--write`` and commit the result.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BANK = REPO / "banks" / "demo"
RESULTS = REPO / "benchmarks" / "results"
BLOCK = re.compile(r"(?P<open><!-- generated: (?P<name>[A-Za-z0-9_.:-]+) -->\n)(?P<body>.*?)"
                   r"(?P<close><!-- /generated -->)", re.S)
VALUE = re.compile(r"(?P<open><!-- value: (?P<key>[A-Za-z0-9_.:-]+)(?: (?P<fmt>[^ ]+))? -->)"
                   r"(?P<body>[^<\n]*)(?P<close><!-- /value -->)")

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from printed_numbers import same_to_last_digit  # noqa: E402  (scripts/ is on the path now)


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


# ---------------------------------------------------------------- sources


@cache
def metrics() -> dict[str, Any]:
    return json.loads((BANK / "report" / "metrics.json").read_text())


@cache
def result(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"no benchmark result file {path.relative_to(REPO)}")
    r = json.loads(path.read_text())
    missing = [k for k in ("command", "date") if not r.get(k)]
    if missing:  # a figure must say what produced it and when
        raise SystemExit(f"{path.relative_to(REPO)} has no {' or '.join(missing)}: rerun it "
                         "with BENCH_RESULT set (benchmarks/_common.py)")
    return r


@cache
def manifest() -> dict[str, Any]:
    return json.loads((BANK / "manifest.json").read_text())


def lookup(source: Any, path: str) -> Any:
    """``source`` at dotted ``path``; a key that itself holds dots (``simulated_oracle.1.0``)
    is matched whole, longest first."""
    parts = path.split(".")
    node, i = source, 0
    while i < len(parts):
        if isinstance(node, list):
            node, i = node[int(parts[i])], i + 1
            continue
        if not isinstance(node, dict):
            raise KeyError(path)
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if key in node:
                node, i = node[key], j
                break
        else:
            raise KeyError(path)
    return node


@cache
def _served_examples() -> dict[str, dict[str, Any]]:
    """Answers of the shipped bank served in-process (scripts/service_examples.py)."""
    import service_examples

    return service_examples.answers()


# ---------------------------------------------------------------- derived values


def _pct_range(lo: float, hi: float) -> str:
    return f"{100 * lo:.0f}–{100 * hi:.0f}%"


def _mixed_row() -> dict[str, Any]:
    return next(r for r in metrics()["summary"] if r["metric"] == "aurc")


def _trailing_margins() -> str:
    gaps = [-r["margin"] for r in metrics()["summary"]
            if r["metric"] == "auroc" and r["margin"] < 0]
    return f"{min(gaps):.3f}–{max(gaps):.3f}"


def _ahead_tasks() -> str:
    """The tasks where trust beats the strongest peer (AURC: lower), with the margin."""
    out = []
    for r in metrics()["summary"]:
        gain = -r["margin"] if r["metric"] == "aurc" else r["margin"]
        if gain > 0:
            out.append(f"{r['task']} ({'AURC' if r['metric'] == 'aurc' else 'AUROC'} "
                       f"{gain:+.3f})")
    return ", ".join(out) if out else "no task"


def _hard_shift_accuracy() -> str:
    acc = [metrics()["shift"][k]["accuracy"] for k in ("contrast", "brightness", "inversion")]
    return _pct_range(min(acc), max(acc))


CALC: dict[str, Callable[[], Any]] = {
    "mixed_aurc_trust": lambda: _mixed_row()["trust"],
    "mixed_aurc_peer_value": lambda: _mixed_row()["peer"],
    "trailing_margin_range": _trailing_margins,
    "trust_ahead_tasks": _ahead_tasks,
    "hard_shift_accuracy_range": _hard_shift_accuracy,
    "build_seconds": lambda: sum(metrics()["timings_s"].values()),
    "trust_reject_rate_clean": lambda: 1.0 - metrics()["threshold"]["coverage"],
    "misclassified_share_clean": lambda: 1.0 - metrics()["classifier"]["test_accuracy"],
    "mixed_aurc_peer": lambda: next(r["best_peer"] for r in metrics()["summary"]
                                    if r["metric"] == "aurc"),
}


def value(key: str, fmt: str | None) -> str:
    source, _, path = key.partition(":")
    if source == "calc":
        if path not in CALC:
            raise SystemExit(f"unknown derived value calc:{path}")
        v = CALC[path]()
    else:
        data = {"metrics": metrics, "manifest": manifest}.get(source)
        v = lookup(data() if data else result(source), path)
    if isinstance(v, str):
        return v
    return format(v, fmt or "g")


# ---------------------------------------------------------------- blocks


def _results(name: str) -> Callable[[], str]:
    def make() -> str:
        import results_table

        return getattr(results_table, name)(metrics())
    return make


def fault_injection_table() -> str:
    """Debugging on injected faults: the summary over all variants and per kind, as
    ``conceptguard inject-faults`` writes it to report/fault_injection.md."""
    from offline.inject_faults import summary_table

    return summary_table(metrics()["fault_injection"]) + "\n"


def classify_sample() -> str:
    import service_examples

    return service_examples.block(_served_examples()["classify"])


def noise_sample() -> str:
    a = _served_examples()["classify_rejected"]
    concepts = ", ".join(f"{c['concept']} ({c['contribution']:+.2f})"
                         for c in a["reason"]["concepts"])
    named = (f"concepts: {concepts}" if concepts else
             "no concepts named (`reason.concepts_unavailable`: the bank's concept competence "
             "check does not pass this class)")
    return (f"For `examples/noise.png` (random pixels) the classifier says *{a['label']}*; "
            f"the monitor answers\n`trust` {a['trust']:.3f}, `reject: "
            f"{json.dumps(a['reject'])}`, `reason.kind: \"{a['reason']['kind']}\"`, "
            f"{named}.\n")


def trust_calibration_table() -> str:
    """Trust as P(right) on the shipped bank: ECE per traffic kind, the reject target on the
    test split, and estimated vs. realised accuracy per stream beside CBPE (metrics.json's
    ``trust_calibration``)."""
    sec = metrics().get("trust_calibration")
    if not isinstance(sec, dict):
        return ("(The shipped bank was built before trust's calibration map: rebuild it to "
                "see these figures.)\n")

    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    ece = "\n".join(f"| {k} | {f(v.get('raw'))} | {f(v.get('calibrated'))} | {v.get('n')} |"
                     for k, v in sec["ece"].items() if k != "fitting_stream_by_kind" and v)
    chk = sec["reject_target_heldout"]
    rows = "\n".join(
        f"| {k} | {v['n']} | {f(v['realised'])} | {f(v['estimated'])} | {f(v['error'])} | "
        f"{f(v.get('cbpe'))} | {f(v.get('cbpe_error'))} |"
        for k, v in sec["estimated_accuracy"].items())
    cbpe = sec.get("cbpe", {})
    cbpe_text = (f"NannyML {cbpe['version']} CBPE fitted on {cbpe.get('fitted_on')}"
                 if "version" in cbpe else f"CBPE not run: {cbpe.get('unavailable')}")
    return (f"| traffic kind | ECE raw | ECE calibrated | n |\n| --- | --- | --- | --- |\n{ece}\n\n"
            f"Reject target on the test split: {chk['what']} {chk['measured']:.4f} (95% "
            f"bootstrap interval {chk['ci95'][0]:.4f} to {chk['ci95'][1]:.4f}) against "
            f"{chk['target_value']}: {'met' if chk['met'] else 'not met'}.\n\n"
            f"| stream | n | realised | trust estimate | error | CBPE | CBPE error |\n"
            f"| --- | --- | --- | --- | --- | --- | --- |\n{rows}\n\n({cbpe_text}.)\n")


BLOCKS: dict[str, Callable[[], str]] = {
    "trust-calibration": trust_calibration_table,
    "results-summary": _results("summary_table"),
    "results-streams": _results("streams_table"),
    "results-shift": _results("shift_table"),
    "results-reasons": _results("reasons_table"),
    "fault-injection": fault_injection_table,
    "classify-sample": classify_sample,
    "noise-sample": noise_sample,
}


def bench_block(name: str) -> str:
    """A result file's provenance line and its figures as a table (see benchmarks/_common)."""
    import bench_tables

    r = result(name)
    head = (f"Command: `{r.get('command', '(not recorded)')}`; date: "
            f"{r.get('date', '(not recorded)')}"
            + (f"; commit: `{r['commit']}`" if r.get("commit") else "")
            + f"; machine: {r.get('cpus', '?')} CPUs "
            f"({r.get('machine', '?')}, Python {r.get('python', '?')}); "
            f"file: `benchmarks/results/{name}.json`.\n\n")
    return head + bench_tables.table(r)


def block(name: str) -> str:
    if name.startswith("bench:"):
        return bench_block(name.removeprefix("bench:"))
    if name not in BLOCKS:
        raise SystemExit(f"unknown generated block {name!r} (known: {sorted(BLOCKS)}, "
                         "bench:FILE)")
    return BLOCKS[name]()


# ---------------------------------------------------------------- rendering


def render(text: str, where: str = "") -> str:
    """``text`` with every generated part refreshed."""
    def sub_block(m: re.Match[str]) -> str:
        body = block(m.group("name"))
        return m.group("open") + body + ("" if body.endswith("\n") else "\n") + m.group("close")

    def sub_value(m: re.Match[str]) -> str:
        try:
            v = value(m.group("key"), m.group("fmt"))
        except (KeyError, IndexError, ValueError) as exc:
            raise SystemExit(f"{where}: value {m.group('key')!r} not found: {exc}") from exc
        return m.group("open") + v + m.group("close")

    return VALUE.sub(sub_value, BLOCK.sub(sub_block, text))


def markers(text: str) -> list[str]:
    return ([f"block {m.group('name')}" for m in BLOCK.finditer(text)]
            + [f"value {m.group('key')}" for m in VALUE.finditer(text)])


def stale_parts(old: str, new: str) -> list[str]:
    """The markers whose content differs between two renderings of one file."""
    out = []
    for pattern, kind, key in ((BLOCK, "block", "name"), (VALUE, "value", "key")):
        a, b = list(pattern.finditer(old)), list(pattern.finditer(new))
        for x, y in zip(a, b, strict=False):
            if x.group("body") != y.group("body"):
                out.append(f"{kind} {x.group(key)}: {x.group('body').strip()[:60]!r} -> "
                           f"{y.group('body').strip()[:60]!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true")
    g.add_argument("--check", action="store_true")
    g.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    from conceptguard.atomic import atomic_write_text

    stale = []
    for path in doc_files():
        text = path.read_text()
        rel = path.relative_to(REPO)
        if args.list:
            for m in markers(text):
                print(f"{rel}: {m}")
            continue
        new = render(text, str(rel))
        if new == text or (args.check and same_to_last_digit(text, new)):
            continue  # a check takes a last-digit flip of a float32 value (printed_numbers)
        if args.write:
            atomic_write_text(path, new)
            print(f"rewrote {rel}", file=sys.stderr)
        else:
            stale += [f"{rel}: {s}" for s in stale_parts(text, new) or ["(changed)"]]
    if stale:
        print("generated doc parts are out of date (python scripts/docs.py --write):\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
