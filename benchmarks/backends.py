"""ONNX Runtime vs. torch eager (and torch.compile where it works) on the serving graph,
batch 1 and 64: images/s and the largest output difference against ONNX Runtime.

    .venv/bin/python benchmarks/backends.py [--bank banks/demo] [--no-compile]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _common import DEMO_BANK, emit, interleaved, machine, test_images

from conceptguard.bank import load_bank
from conceptguard.classifier.io import load_classifier
from conceptguard.export import MonitoredClassifier
from conceptguard.runtime import OnnxRuntime, TorchRuntime


def max_diff(a, b) -> float:
    return float(max(np.abs(a.logits - b.logits).max(), np.abs(a.concepts - b.concepts).max()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, default=DEMO_BANK)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    bank = load_bank(args.bank)
    module = MonitoredClassifier(load_classifier(bank.classifier_path)[0], bank.projection())
    runtimes = {"onnx": OnnxRuntime(bank.onnx_path), "torch_eager": TorchRuntime(module)}
    compile_error = None
    if not args.no_compile:
        try:
            rt = TorchRuntime(MonitoredClassifier(load_classifier(bank.classifier_path)[0],
                                                  bank.projection()), compile=True)
            rt.run(test_images(2))
            runtimes["torch_compile"] = rt
        except Exception as exc:  # compile needs a C++ toolchain; report, don't fail
            compile_error = f"{type(exc).__name__}: {str(exc)[:200]}"
    results = {}
    for batch in (1, 64):
        x = test_images(batch)
        ref = runtimes["onnx"].run(x)
        r = interleaved({k: (lambda rt=rt, x=x: rt.run(x)) for k, rt in runtimes.items()},
                        batch)
        base = r["onnx"]["items_per_s"]
        results[f"batch_{batch}"] = {
            k: {"images_per_s": round(v["items_per_s"], 1),
                "ratio_to_onnx": round(v["items_per_s"] / base, 3),
                "max_abs_diff_vs_onnx": max_diff(runtimes[k].run(x), ref)}
            for k, v in r.items()}
        for v in results[f"batch_{batch}"].values():
            v["within_tolerance_1e-3"] = v["max_abs_diff_vs_onnx"] <= 1e-3
    emit("backends", {**machine(), "devices": {k: rt.device for k, rt in runtimes.items()},
                      "torch_compile_error": compile_error, "results": results})


if __name__ == "__main__":
    main()
