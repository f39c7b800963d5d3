"""What a user would try first: run the VLM on every request to get concept scores (the
oracle view cos(v(x), t_k)), against conceptguard's projection (classifier + affine map +
concept matrix in one ONNX graph). Prints images/s of both and the ratio.

    .venv/bin/python benchmarks/vs_vlm_at_runtime.py [--bank banks/demo] [--size 224]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _common import DEMO_BANK, emit, machine, test_images, throughput

from conceptguard.bank import load_bank
from conceptguard.runtime import OnnxRuntime
from conceptguard.vlm import VLMSpec, create_vlm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, default=DEMO_BANK)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    bank = load_bank(args.bank)
    spec = VLMSpec(**bank.manifest.vlm["spec"])
    vlm = create_vlm(spec)
    T = bank.tensors["concepts.T"]
    rt = OnnxRuntime(bank.onnx_path)
    x = test_images(args.batch)
    u8 = (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)

    def vlm_path():
        return vlm.encode_images(u8) @ T.T

    ours = throughput(lambda: rt.run(x), args.batch, 3.0)
    theirs = throughput(vlm_path, args.batch, 6.0, warmup=1)
    emit("vs_vlm_at_runtime", {
        **machine(), "vlm": vlm.id, "vlm_image_size": spec.image_size, "batch": args.batch,
        "conceptguard_images_per_s": round(ours["items_per_s"], 1),
        "vlm_every_request_images_per_s": round(theirs["items_per_s"], 1),
        "speedup": round(ours["items_per_s"] / theirs["items_per_s"], 1),
        "note": "the VLM here is the small ConSE model; a CLIP ViT-B/32 is slower still",
    })


if __name__ == "__main__":
    main()
