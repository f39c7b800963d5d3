"""KNN's reference set size: what a class-stratified subset costs in detection and saves in
the fused graph, for banks built from the same config and caches with only
``calibration.detectors.knn_reference`` changed (``knn_k`` stays 10: a subset scales it,
:func:`conceptguard.detectors.scaled_k`).

Detection: every AUROC the candidate's report gives (every task of the misclassification,
mixed, adversarial, foreign, shift and traffic-mix sections; KNN itself, ``trust`` and the
four heads) against the baseline's bootstrap 95% interval for the same task and score:
below, within or above it; and the mean and the worst change. Both banks score the same test
images, so a paired difference would have a narrower interval than the baseline's own: the
test here is the lenient one, and the mean change says which way the subset moves.

Cost: the fused graph (classifier + monitor) of each bank and a
classify-only graph, timed in interleaved rounds in one run, at batch 1 and 64 (ONNX
Runtime, CPU, one thread), as ``benchmarks/monitor_graph.py`` times them; the overhead is
the median of the rounds' own ratios to classify-only.

    # build the candidates first, e.g. with knn_reference: 2000 in a copy of the config:
    .venv/bin/python -m offline.cli build-bank --config <copy> --out <bank>
    PYTHONPATH=. .venv/bin/python benchmarks/knn_reference.py --base banks/demo <bank> [...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import DEMO_BANK, emit, interleaved, machine, test_images
from monitor_graph import GOALS, session

from conceptguard.bank import load_bank
from conceptguard.classifier.io import load_classifier
from conceptguard.detectors import KNN
from conceptguard.export import INPUT_NAME, onnx_export
from conceptguard.monitor_graph import FUSED_OUTPUTS, export_bank_fused_onnx

SECTIONS = ("misclassification", "mixed", "adversarial", "foreign", "shift",
            "mixed_compositions")
SCORES = ("knn", "trust", "head_misclassification", "head_anomaly", "head_adversarial",
          "head_unfamiliar")


def auroc_cells(metrics: dict) -> dict[str, dict]:
    """``{"section/task/score": {"auroc", "ci95"}}`` for every task and score of
    :data:`SCORES` the report holds (a section with ``trust`` at its top is one task)."""
    cells = {}
    for section in SECTIONS:
        part = metrics.get(section)
        if not isinstance(part, dict):
            continue
        tasks = {section: part} if "trust" in part else part
        for task, scores in tasks.items():
            if not isinstance(scores, dict):
                continue
            for name in SCORES:
                cell = scores.get(name)
                if isinstance(cell, dict) and isinstance(cell.get("ci95"), list) \
                        and None not in cell["ci95"]:
                    cells[f"{section}/{task}/{name}"] = cell
    return cells


def against_intervals(base: dict, cand: dict) -> dict:
    """Each of the candidate's AUROCs against the baseline's interval for the same cell."""
    b, c = auroc_cells(base), auroc_cells(cand)
    rows = {}
    for key in b.keys() & c.keys():
        lo, hi = b[key]["ci95"]
        a = c[key]["auroc"]
        rows[key] = {"base": b[key]["auroc"], "ci95": [lo, hi], "candidate": a,
                     "where": "below" if a < lo else "above" if a > hi else "within"}
    below = sorted(k for k, r in rows.items() if r["where"] == "below")
    deltas = np.array([r["candidate"] - r["base"] for r in rows.values()])
    return {"cells": len(rows), "below": len(below), "above":
            sum(r["where"] == "above" for r in rows.values()),
            "below_cells": {k: rows[k] for k in below},
            "mean_delta": round(float(deltas.mean()), 5),
            "worst_delta": round(float(deltas.min()), 5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=DEMO_BANK)
    ap.add_argument("banks", type=Path, nargs="+")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = [load_bank(p) for p in (args.base, *args.banks)]
    knn = [b.monitor.detectors.get("knn") for b in loaded]
    if not all(isinstance(d, KNN) for d in knn):
        raise SystemExit("every bank needs a fitted KNN detector")
    # each bank by its reference size (the baseline first, "base")
    names = ["base", *(f"knn_reference_{len(d.bank)}" for d in knn[1:])]  # type: ignore[union-attr]
    if len(set(names)) != len(names):
        raise SystemExit("two candidate banks have the same KNN reference size")
    banks = dict(zip(names, loaded, strict=True))
    metrics = {k: json.loads((b.path / "report" / "metrics.json").read_text())
               for k, b in banks.items()}
    refs = {k: len(d.bank) for k, d in zip(names, knn, strict=True)}  # type: ignore[union-attr]
    ks = {k: d.k for k, d in zip(names, knn, strict=True)}  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, spec, _ = load_classifier(banks["base"].classifier_path)
        onnx_export(model, (torch.zeros((2, *spec.input_shape)),), (INPUT_NAME,),
                    ("logits",), folder / "classify.onnx")
        sessions = {"classify_only": session(folder / "classify.onnx")}
        for i, (k, b) in enumerate(banks.items()):
            export_bank_fused_onnx(b, folder / f"fused{i}.onnx")
            sessions[k] = session(folder / f"fused{i}.onnx")
    cost = {}
    for batch in (1, 64):
        feed = {INPUT_NAME: np.ascontiguousarray(test_images(batch))}
        fns = {k: (lambda s=s, f=feed, names=(["logits"] if k == "classify_only"
                                              else list(FUSED_OUTPUTS)): s.run(names, f))
               for k, s in sessions.items()}
        r = interleaved(fns, batch, rounds=args.rounds, seconds_per_round=0.4)
        ms = {k: 1e3 * batch / v["items_per_s"] for k, v in r.items()}
        cost[f"batch_{batch}"] = {
            "goal": f"<= {GOALS[batch]}", "classify_only_ms": round(ms["classify_only"], 4),
            "fused_ms": {k: round(v, 4) for k, v in ms.items() if k != "classify_only"},
            # the median of the rounds' own ratios (a round times every graph seconds
            # apart: the machine's drifts between rounds cancel)
            "overhead": {k: round(float(np.median(np.divide(
                r["classify_only"]["rounds"], r[k]["rounds"]))) - 1, 4)
                for k in ms if k != "classify_only"}}
    emit("knn_reference", {
        "runtime": "onnxruntime CPU, 1 intra-op thread", **machine(),
        "banks": {k: {"knn_reference": refs[k], "knn_k": ks[k],
                      **({} if k == "base" else
                         {"detection": against_intervals(metrics["base"], metrics[k])})}
                  for k in banks},
        "cost": cost})


if __name__ == "__main__":
    main()
