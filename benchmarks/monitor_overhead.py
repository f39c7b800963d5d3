"""Cost of the monitor next to the classifier it watches, in process, same ONNX session.

classify-only: the session asked for the logits alone. monitored: the same session asked
for logits, features and concept scores, then the shared scoring function (signals, both
defect heads, trust, reject, concept contributions). Target: overhead <= 3%.

    .venv/bin/python benchmarks/monitor_overhead.py [--bank banks/demo]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import DEMO_BANK, emit, interleaved, machine, test_images

from conceptguard.bank import load_bank
from conceptguard.runtime import OnnxRuntime
from conceptguard.scoring import score


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, default=DEMO_BANK)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    bank = load_bank(args.bank)
    rt = OnnxRuntime(bank.onnx_path, device="auto")
    results = {}
    for batch in (1, 64):
        x = test_images(batch)

        def classify_only(x=x):
            return rt.classify(x)

        def monitored(x=x):
            o = rt.run(x)
            return score(bank.monitor, o.logits, o.features, o.concepts)

        outputs = rt.run(x)

        def scoring_only(o=outputs):
            return score(bank.monitor, o.logits, o.features, o.concepts)

        r = interleaved({"classify_only": classify_only, "monitored": monitored,
                         "scoring_only": scoring_only}, batch, rounds=args.rounds)
        overhead = r["classify_only"]["items_per_s"] / r["monitored"]["items_per_s"] - 1
        results[f"batch_{batch}"] = {
            "classify_only_images_per_s": round(r["classify_only"]["items_per_s"], 1),
            "monitored_images_per_s": round(r["monitored"]["items_per_s"], 1),
            "scoring_only_images_per_s": round(r["scoring_only"]["items_per_s"], 1),
            "overhead_ratio": round(overhead, 4),
            "target": "<= 0.03",
            "met": overhead <= 0.03,
        }
    emit("monitor_overhead", {"device": rt.device, **machine(), "results": results})


if __name__ == "__main__":
    main()
