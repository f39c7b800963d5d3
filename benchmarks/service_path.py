"""The service's batch function with and without the fused graph, in process: the bank as
shipped (``monitor.onnx``: one ONNX Runtime call gives every score) against a copy of it
without ``monitor.onnx`` (``classifier.onnx`` then numpy ``score()``, as before), both
loaded by the service's own loader (probe-batch validation included), ONNX Runtime on the
CPU with one intra-op thread.

Timed per batch of uint8 images (decoded PNGs): the real
:meth:`service.dataplane.DataPlane.run_batch` (to model input, runtime, scoring, each
image a reference to its row of the batch's
:class:`conceptguard.scoring.Scores`), then the rows gathered back
(:func:`service.dataplane.gather`, what a request of that many images reads).
Candidates alternate in short rounds; ms per batch of the median round.

    .venv/bin/python benchmarks/service_path.py [--bank banks/demo] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _common import DEMO_BANK, emit, interleaved, machine, test_images

from service.dataplane import DataPlane, Job, gather
from service.runtime_state import RuntimeState, load
from service.settings import load_settings


def without_fused_graph(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "monitor.onnx").unlink()
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["files"]["monitor.onnx"]
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, default=DEMO_BANK)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    settings = load_settings(bank=str(args.bank), backend="onnx", device="cpu", threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        fused = load(args.bank, settings)
        numpy_ = load(without_fused_graph(args.bank, Path(tmp) / "bank"), settings)
    assert (fused.runtime.graph, numpy_.runtime.graph) == ("fused", "classifier")
    plane = DataPlane(RuntimeState(settings), settings)
    results = {}
    try:
        for batch in (1, 64):
            images = (test_images(batch) * 255).round().astype(np.uint8)  # NCHW
            hwc = [np.ascontiguousarray(im.transpose(1, 2, 0)) for im in images]

            def path(loaded, hwc=hwc):
                rows = plane.run_batch([Job(loaded, a) for a in hwc])
                return gather(rows)[0]

            a, b = path(fused), path(numpy_)
            assert np.array_equal(a.predictions, b.predictions)
            err = float(np.abs(a.trust - b.trust).max())
            r = interleaved({"fused": lambda: path(fused), "numpy": lambda: path(numpy_)},
                            batch, rounds=args.rounds, seconds_per_round=0.4)
            ms = {k: 1e3 * batch / v["items_per_s"] for k, v in r.items()}
            results[f"batch_{batch}"] = {
                "ms_per_batch": {k: round(v, 4) for k, v in ms.items()},
                "numpy_over_fused": round(ms["numpy"] / ms["fused"], 3),
                "max_abs_trust_diff": err,
            }
    finally:
        plane._executor.shutdown(wait=False)
    emit("service_path", {"runtime": f"onnxruntime {ort.__version__} CPU, 1 intra-op thread",
                          **machine(), "results": results})


if __name__ == "__main__":
    main()
