"""Print a /v1/monitor request body for image files: the ``features`` and ``logits`` outputs
of a bank's ``classifier.onnx`` (the serving graph), one row per image.

    python scripts/features_json.py examples/bag.png [more.png ...] [--bank banks/demo] \\
        > features.json
    curl -s http://127.0.0.1:8000/v1/monitor -H 'Content-Type: application/json' \\
        -d @features.json

In sidecar mode these rows come from your own inference server instead: the penultimate
layer's output (``features``, [N, d]) and the logits ([N, C]) of the classifier the bank
was built for.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--bank", type=Path, default=REPO / "banks" / "demo")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import numpy as np

    from conceptguard.bank import BankError, load_bank
    from conceptguard.imaging import ImageError, preprocess_bytes, to_model_input
    from conceptguard.runtime import OnnxRuntime

    try:
        bank = load_bank(args.bank)
        pre = bank.manifest.preprocessing
        images = np.stack([preprocess_bytes(path.read_bytes(), input_size=pre.input_size,
                                            channels=pre.channels, max_bytes=1 << 26,
                                            max_pixels=1 << 26) for path in args.images])
    except (OSError, BankError, ImageError) as exc:
        print(f"features_json: {exc}", file=sys.stderr)
        return 2
    out = OnnxRuntime(bank.onnx_path, device="cpu").run(to_model_input(images))
    print(json.dumps({"features": out.features.tolist(), "logits": out.logits.tolist()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
