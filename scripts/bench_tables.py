"""Markdown tables of benchmark result files (``benchmarks/results/*.json``), one function
per benchmark and a flat key/value table for the rest; ``scripts/docs.py`` puts them in
docs/benchmarks.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PROVENANCE = {"benchmark", "command", "date", "machine", "cpus", "python", "platform",
              "provenance"}


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
    engine = r["engine"] + (f", {r['workers']} worker(s)" if r["engine"] == "ray" else "")
    return _rows([f"stage ({engine}, scale {r['scale']:g})", "seconds", "share"], rows)


def _batches(r: dict[str, Any]) -> list[str]:
    return [k for k in r["results"] if k.startswith("batch_")]


MONITOR_GRAPH_ROWS = {
    "classify_only": "classify-only graph (images -> logits)",
    "serving": "serving graph (`classifier.onnx`: logits, features, concepts)",
    "fused": "fused graph (classifier + monitor)",
    "fused_scores": "fused graph + `scores_from_graph` (the service's per-batch work)",
    "numpy": "`classifier.onnx` + numpy `score()`",
    "monitor_alone": "monitor-only graph (on precomputed outputs)",
}


def monitor_graph(r: dict[str, Any]) -> str:
    batches = _batches(r)
    rows = []
    for key, label in MONITOR_GRAPH_ROWS.items():
        cells = []
        for b in batches:
            ms = r["results"][b]["ms_per_batch"][key]
            base = r["results"][b]["ms_per_batch"]["classify_only"]
            if key == "monitor_alone":  # not a superset of classify-only: its share of it
                cells.append(f"{ms:.3f} ({100 * ms / base:.0f}% of classify-only)")
            elif key == "classify_only":
                cells.append(f"{ms:.3f}")
            else:
                cells.append(f"{ms:.3f} ({100 * (ms / base - 1):+.0f}%)")
        rows.append([label, *cells])
    head = ["candidate (KNN references: " + str(r.get("knn_reference", "?")) + ")",
            *(f"batch {b.removeprefix('batch_')}: ms (vs. classify-only)" for b in batches)]
    goals = ", ".join(f"batch {b.removeprefix('batch_')}: goal "
                      f"{r['results'][b]['goal']}, "
                      f"{'met' if r['results'][b]['fused_meets_goal'] else 'not met'}"
                      for b in batches)
    return _rows(head, rows) + f"\nFused graph against classify-only: {goals}.\n"


def backends(r: dict[str, Any]) -> str:
    batches = _batches(r)
    names = list(r["results"][batches[0]])
    rows = [[name, *(f"{r['results'][b][name]['images_per_s']:.0f} "
                     f"({r['results'][b][name]['ratio_to_onnx']:.2f}x)" for b in batches),
             f'{max(r["results"][b][name]["max_abs_diff_vs_onnx"] for b in batches):.1e}']
            for name in names]
    note = (f"\ntorch.compile: {r['torch_compile_error']}\n" if r.get("torch_compile_error")
            else "")
    return _rows(["runtime", *(f"batch {b.removeprefix('batch_')} img/s (vs. ONNX)"
                               for b in batches), "max abs diff vs. ONNX"], rows) + note


def service_path(r: dict[str, Any]) -> str:
    rows = [[b.removeprefix("batch_"), f"{v['ms_per_batch']['fused']:.2f}",
             f"{v['ms_per_batch']['numpy']:.2f}", f"{v['numpy_over_fused']:.2f}x",
             f"{v['max_abs_trust_diff']:.1e}"] for b, v in r["results"].items()]
    return _rows(["batch", "fused graph ms", "numpy `score()` ms", "numpy / fused",
                  "max trust difference"], rows)


def peers(r: dict[str, Any]) -> str:
    import statistics

    conns = sorted({c for runs in r["runs"].values() for c in runs}, key=int)
    rows = []
    for server, runs in r["runs"].items():
        cpu = [f"{statistics.median(x['cpu_ms_per_request'] for x in runs[c]):.2f}"
               if c in runs else "-" for c in conns]
        first = runs.get(conns[0], [])
        rps = (f"{statistics.median(x['requests_per_s'] for x in first):.0f} (p50 "
               f"{statistics.median(x['p50_ms'] for x in first):.2f} ms)" if first else "-")
        rows.append([server, *cpu, rps])
    table = _rows(["server, request", *(f"CPU ms / req, c={c}" for c in conns),
                   f"req/s at c={conns[0]} (p50)"], rows)
    goal_rows = [[pair, *(f"{g['cpu_ratio'][c]:.2f}" for c in conns),
                  f"{g['p50_difference_ms']:+.2f} ms",
                  "met" if g["cpu_goal_met"] and g["p50_goal_met"] else "not met"]
                 for pair, g in r["goals"].items()]
    return table + "\n" + _rows(["with monitor / peer without", *(f"CPU ratio c={c}"
                                                                   for c in conns),
                                 f"p50 difference c={conns[0]}", "goal"], goal_rows)


def build_memory(r: dict[str, Any]) -> str:
    rows = [[f"{x['images']:,}", f"{x['n_test']:,}", f"{x['peak_rss_mib']:,.0f} MiB",
             f"{x['wall_s']:.0f} s ({x['images_per_s']:.0f})"] for x in r["rows"]]
    rows.append(["**peak(last) / peak(first)**", "", f"**{r['peak_ratio_last_over_first']}**",
                 ""])
    return _rows(["images in the folder", "test split", "peak RSS",
                  "build wall time (images/s)"], rows)


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
    "worker_footprint": worker_footprint, "offline": offline, "monitor_graph": monitor_graph,
    "backends": backends, "service_path": service_path, "peers": peers,
    "build_memory": build_memory,
}


def table(r: dict[str, Any]) -> str:
    return TABLES.get(r.get("benchmark", ""), flat)(r)
