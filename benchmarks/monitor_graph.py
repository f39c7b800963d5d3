"""The monitor inside the serving graph vs. numpy beside it, in process, ONNX Runtime on the
CPU with one intra-op thread (the issue's goal: overhead <= 20% at batch 1, <= 3% at 64).

Candidates, timed in interleaved rounds in one run (ms per batch, median round):

- classify_only: a graph of the classifier alone (images -> logits), exported here;
- serving: the bank's ``classifier.onnx`` (logits, features, concepts), no monitor;
- fused: classifier + projection + monitor in one graph (``export_bank_fused_onnx``);
- fused_scores: ``fused`` then :func:`~conceptguard.scoring.scores_from_graph` (what the
  service does per batch on a bank with ``monitor.onnx``);
- fused_knn_1/N: the same with every N-th KNN reference feature (cost of the KNN bank);
- numpy: ``classifier.onnx`` then ``score()`` (the sidecar path before this graph);
- monitor_alone(_knn_1/N): the monitor-only graph on precomputed logits/features/concepts.

    .venv/bin/python benchmarks/monitor_graph.py [--bank banks/demo] [--rounds 5]
"""

from __future__ import annotations

import argparse
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


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, default=DEMO_BANK)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--knn-subsample", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bank = load_bank(args.bank)
    d = bank.manifest.dims
    sub = args.knn_subsample
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, spec, _ = load_classifier(bank.classifier_path)
        onnx_export(model, (torch.zeros((2, *spec.input_shape)),), (INPUT_NAME,),
                    ("logits",), folder / "classify.onnx")
        export_bank_fused_onnx(bank, folder / "fused.onnx")
        export_bank_fused_onnx(bank, folder / "fused_sub.onnx", knn_subsample=sub)
        export_monitor_onnx(bank.monitor, (d.classes, d.features, d.concepts),
                            folder / "monitor.onnx")
        export_monitor_onnx(bank.monitor, (d.classes, d.features, d.concepts),
                            folder / "monitor_sub.onnx", knn_subsample=sub)
        classify, serving = session(folder / "classify.onnx"), session(bank.onnx_path)
        fused, fused_sub = session(folder / "fused.onnx"), session(folder / "fused_sub.onnx")
        monitor = session(folder / "monitor.onnx")
        monitor_sub = session(folder / "monitor_sub.onnx")
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
            f"fused_knn_1/{sub}": lambda feed=feed: fused_sub.run(list(FUSED_OUTPUTS), feed),
            "numpy": numpy_path,
            "monitor_alone": lambda s=served: monitor.run(list(MONITOR_OUTPUTS), s),
            f"monitor_alone_knn_1/{sub}":
                lambda s=served: monitor_sub.run(list(MONITOR_OUTPUTS), s),
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
    emit("monitor_graph", {"runtime": f"onnxruntime {ort.__version__} CPU, 1 intra-op thread",
                           **machine(), "results": results})


if __name__ == "__main__":
    main()
