"""Time per stage of build-bank and the VLM stage's images/s, from a cold cache.

Runs the offline job on a reduced config (by default: the demo config with every split
scaled down so the whole run fits in a few minutes on 2 cores) in a temporary cache and
output folder, then prints the stage timings, the share of each stage and the slowest one.

    .venv/bin/python benchmarks/offline.py [--config configs/fashion-mnist-demo.yaml]
                                           [--scale 0.25] [--engine local|ray] [--workers 2]

``--engine ray`` runs the per-image stages on Ray Data (``build-bank --engine ray``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# This file's name shadows the ``offline`` package: the repo root goes first on the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if p != str(_HERE)), str(_HERE)]

from _common import REPO, emit, machine  # noqa: E402

from offline.config import load_config  # noqa: E402
from offline.engine import make_engine  # noqa: E402
from offline.pipeline import build_bank  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "fashion-mnist-demo.yaml")
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--engine", choices=["local", "ray"], default="local")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(args.config)
    if not cfg.classifier.path.is_absolute():
        cfg.classifier.path = REPO / cfg.classifier.path
    if not cfg.classifier.path.is_file():  # a fresh clone: train-demo has not run
        shipped = REPO / "banks" / "demo" / "classifier.safetensors"
        print(f"{cfg.classifier.path} does not exist (conceptguard train-demo writes it); "
              f"timing the shipped demo bank's classifier, {shipped.relative_to(REPO)}",
              file=sys.stderr)
        cfg.classifier.path = shipped
    sp = cfg.splits
    for name in ("fit", "reference", "calibration"):
        setattr(sp, name, max(100, int(getattr(sp, name) * args.scale)))
    sp.test = max(200, int((sp.test or 10000) * args.scale))
    cfg.adversarial.per_split = max(50, int(cfg.adversarial.per_split * args.scale))
    cfg.evaluation.vlm_test_images = max(100, int(cfg.evaluation.vlm_test_images * args.scale))
    with tempfile.TemporaryDirectory() as tmp:
        cfg.cache_dir = Path(tmp) / "cache"
        engine = make_engine(args.engine, workers=args.workers)
        try:
            out = build_bank(cfg, Path(tmp) / "bank", progress=False, engine=engine)
        finally:
            engine.close()
        metrics = json.loads((out / "report" / "metrics.json").read_text())
    timings = metrics["timings_s"]
    total = sum(timings.values())
    n_vlm = sp.fit + sp.reference + min(cfg.evaluation.vlm_test_images, sp.test) \
        + metrics["misclassification"]["n_wrong"]
    emit("offline", {
        **machine(), "scale": args.scale, "engine": args.engine,
        "workers": args.workers if args.engine == "ray" else 1,
        "splits": {"fit": sp.fit, "reference": sp.reference, "calibration": sp.calibration,
                   "test": sp.test, "adversarial_per_split": cfg.adversarial.per_split},
        "vlm": cfg.vlm.model_dump(),
        "timings_s": timings, "total_s": round(total, 1),
        "share": {k: round(v / total, 3) for k, v in timings.items()},
        "slowest_stage": max(timings, key=timings.get),
        "vlm_images_embedded_approx": n_vlm,
        "vlm_images_per_s_approx": round(n_vlm / timings["vlm"], 1),
    })


if __name__ == "__main__":
    main()
