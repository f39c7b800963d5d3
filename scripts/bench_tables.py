"""Markdown tables of benchmark result files (``benchmarks/results/*.json``), one function
per benchmark and a flat key/value table for the rest; ``scripts/docs.py`` puts them in
docs/benchmarks.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PROVENANCE = {"benchmark", "command", "date", "machine", "cpus", "python", "platform"}


def _rows(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def monitor_overhead(r: dict[str, Any]) -> str:
    rows = []
    for key, v in r["results"].items():
        rows.append([key.removeprefix("batch_"), f"{v['classify_only_images_per_s']:.0f}",
                     f"{v['monitored_images_per_s']:.0f}", f"{v['scoring_only_images_per_s']:.0f}",
                     f"{100 * v['overhead_ratio']:.1f}%", "yes" if v["met"] else "no"])
    return _rows(["batch", "classify-only img/s", "monitored img/s", "scoring alone img/s",
                  "overhead", "target (<= 3%) met"], rows)


def vs_vlm_at_runtime(r: dict[str, Any]) -> str:
    return _rows([f"path (batch {r['batch']})", "img/s"], [
        ["conceptguard: classifier + affine map + concept matrix in one ONNX graph",
         f"{r['conceptguard_images_per_s']:.0f}"],
        [f"VLM on every request (`{r['vlm']}`) then cosine to the concepts",
         f"{r['vlm_every_request_images_per_s']:.0f}"],
        ["**ratio**", f"**{r['speedup']:g}x**"]])


def worker_footprint(r: dict[str, Any]) -> str:
    rows = [[i + 1, f"{run['ready_s']:.2f} s", f"{run['rss_mib']} MiB",
             "yes" if run["libtorch_mapped"] else "no"] for i, run in enumerate(r["runs"])]
    rows.append(["**median**", f"**{r['median_ready_s']:.2f} s**",
                 f"**{r['median_rss_mib']:g} MiB**", ""])
    return _rows([f"start ({r['backend']} backend)", "ready", "RSS after one request",
                  "libtorch mapped"], rows)


def offline(r: dict[str, Any]) -> str:
    rows = [[stage, f"{s:.1f}", f"{100 * r['share'][stage]:.0f}%"]
            for stage, s in r["timings_s"].items()]
    rows.append(["**total**", f"**{r['total_s']:.1f}**", ""])
    return _rows([f"stage ({r['engine']}, scale {r['scale']:g})", "seconds", "share"], rows)


def flat(r: dict[str, Any]) -> str:
    """Every number of the file, one row per dotted key (for files without a table)."""
    rows: list[list[Any]] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}")
        elif key.split(".")[0] not in PROVENANCE:
            rows.append([f"`{key}`", node])

    walk(r, "")
    return _rows(["figure", "value"], rows)


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "monitor_overhead": monitor_overhead, "vs_vlm_at_runtime": vs_vlm_at_runtime,
    "worker_footprint": worker_footprint, "offline": offline,
}


def table(r: dict[str, Any]) -> str:
    return TABLES.get(r.get("benchmark", ""), flat)(r)
