"""The monitor inside the serving graph vs. numpy beside it, in process, ONNX Runtime on the
CPU with one intra-op thread (the issue's goal: overhead <= 20% at batch 1, <= 3% at 64).

Candidates, timed in interleaved rounds in one run (ms per batch, median round):

- classify_only: a graph of the classifier alone (images -> logits), exported here;
- serving: the bank's ``classifier.onnx`` (logits, features, concepts), no monitor;
- fused: classifier + projection + monitor in one graph (``export_bank_fused_onnx``);
- fused_scores: ``fused`` then :func:`~conceptguard.scoring.scores_from_graph` (what the
  service does per batch on a bank with ``monitor.onnx``);
- numpy: ``classifier.onnx`` then ``score()`` (the sidecar path before this graph);
- monitor_alone: the monitor-only graph on precomputed logits/features/concepts.

The KNN reference set's size is the bank's (``calibration.detectors.knn_reference``, fitted
and calibrated with it); its cost is in ``fused`` and ``monitor_alone``.

    .venv/bin/python benchmarks/monitor_graph.py [--bank banks/demo] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _common import DEMO_BANK, emit, interleaved, machine, test_images

from conceptguard.bank import load_bank
from conceptguard.classifier.io import load_classifier
from conceptguard.export import INPUT_NAME, onnx_export
from conceptguard.monitor_graph import (
    FUSED_OUTPUTS,
    MONITOR_INPUTS,
    MONITOR_OUTPUTS,
    export_bank_fused_onnx,
    export_monitor_onnx,
)
from conceptguard.scoring import score, scores_from_graph

GOALS = {1: 0.20, 64: 0.03}


def session(path: Path, optimised: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimised is not None:  # write the graph ONNX Runtime runs (after its fusions)
        opts.optimized_model_filepath = str(optimised)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def optimised_nodes(path: Path) -> int:
    """Nodes of the graph ONNX Runtime runs after optimisation: at batch 1 the monitor's
    cost is mostly one dispatch per node."""
    import onnx

    out = path.with_suffix(".opt.onnx")
    session(path, out)
    return len(onnx.load(str(out), load_external_data=False).graph.node)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, default=DEMO_BANK)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    bank = load_bank(args.bank)
    d = bank.manifest.dims
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, spec, _ = load_classifier(bank.classifier_path)
        onnx_export(model, (torch.zeros((2, *spec.input_shape)),), (INPUT_NAME,),
                    ("logits",), folder / "classify.onnx")
        export_bank_fused_onnx(bank, folder / "fused.onnx")
        export_monitor_onnx(bank.monitor, (d.classes, d.features, d.concepts),
                            folder / "monitor.onnx")
        classify, serving = session(folder / "classify.onnx"), session(bank.onnx_path)
        fused, monitor = session(folder / "fused.onnx"), session(folder / "monitor.onnx")
        nodes = {name: optimised_nodes(folder / f"{name}.onnx")
                 for name in ("classify", "fused", "monitor")}
    results = {}
    for batch in (1, 64):
        x = np.ascontiguousarray(test_images(batch))
        feed = {INPUT_NAME: x}
        served = dict(zip(MONITOR_INPUTS, serving.run(list(MONITOR_INPUTS), feed), strict=True))

        def numpy_path(feed=feed):
            lg, z, s = serving.run(list(MONITOR_INPUTS), feed)
            return score(bank.monitor, lg, z, s)

        fns = {
            "classify_only": lambda feed=feed: classify.run(["logits"], feed),
            "serving": lambda feed=feed: serving.run(list(MONITOR_INPUTS), feed),
            "fused": lambda feed=feed: fused.run(list(FUSED_OUTPUTS), feed),
            "fused_scores": lambda feed=feed: scores_from_graph(
                dict(zip(FUSED_OUTPUTS, fused.run(list(FUSED_OUTPUTS), feed), strict=True)),
                bank.monitor.threshold),
            "numpy": numpy_path,
            "monitor_alone": lambda s=served: monitor.run(list(MONITOR_OUTPUTS), s),
        }
        r = interleaved(fns, batch, rounds=args.rounds, seconds_per_round=0.4)
        ms = {k: 1e3 * batch / v["items_per_s"] for k, v in r.items()}
        base = ms["classify_only"]
        results[f"batch_{batch}"] = {
            "ms_per_batch": {k: round(v, 4) for k, v in ms.items()},
            "overhead_vs_classify_only": {k: round(v / base - 1, 4) for k, v in ms.items()
                                          if k != "classify_only"},
            "goal": f"<= {GOALS[batch]}",
            "fused_meets_goal": ms["fused"] / base - 1 <= GOALS[batch],
        }
    knn = bank.monitor.detectors["knn"]
    emit("monitor_graph", {"runtime": f"onnxruntime {ort.__version__} CPU, 1 intra-op thread",
                           **machine(), "knn_reference": len(knn.bank),  # type: ignore[attr-defined]
                           "optimised_nodes": nodes, "results": results,
                           # 1-minute load average before and after: a shared machine's
                           # load slows every candidate (read the ratios)
                           "load_average_1min": [round(load_before[0], 2),
                                                 round(os.getloadavg()[0], 2)]})


if __name__ == "__main__":
    main()
