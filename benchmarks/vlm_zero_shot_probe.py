"""Throwaway probe: ConSE throughput and Fashion-MNIST zero-shot accuracy.

Run: .venv/bin/python benchmarks/vlm_zero_shot_probe.py [--n 2000] [--skip-speed]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import os
import time
from pathlib import Path

import numpy as np
import torch

from conceptguard.concepts import class_matrix, load_concept_set
from conceptguard.vlm import VLMSpec, create_vlm
from conceptguard.vlm import conse as conse_mod
from conceptguard.vlm.preprocess import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]
PHRASINGS: dict[str, dict[str, list[str]]] = {
    "raw": {},
    "natural": {
        "T-shirt/top": ["t-shirt"], "Trouser": ["pair of trousers"],
        "Pullover": ["pullover sweater"],
        "Dress": ["dress"], "Coat": ["coat"], "Sandal": ["sandal"], "Shirt": ["shirt"],
        "Sneaker": ["sneaker"], "Bag": ["bag"], "Ankle boot": ["ankle boot"],
    },
    "synonyms": {
        "T-shirt/top": ["t-shirt", "top"], "Trouser": ["trousers", "pants"],
        "Pullover": ["pullover", "sweater"], "Dress": ["dress"], "Coat": ["coat", "jacket"],
        "Sandal": ["sandal"], "Shirt": ["shirt"], "Sneaker": ["sneaker", "running shoe"],
        "Bag": ["bag", "handbag"], "Ankle boot": ["ankle boot", "boot"],
    },
    "imagenet_words": {
        "T-shirt/top": ["t-shirt", "jersey"], "Trouser": ["trousers", "jeans"],
        "Pullover": ["pullover", "sweatshirt"], "Dress": ["dress", "gown"],
        "Coat": ["coat", "trench coat"], "Sandal": ["sandal"], "Shirt": ["shirt"],
        "Sneaker": ["sneaker", "running shoe"], "Bag": ["bag", "purse"],
        "Ankle boot": ["ankle boot", "cowboy boot"],
    },
}
TEMPLATE_SETS = {
    "photo": ["a photo of a {}."],
    "photo+gray": ["a photo of a {}.", "a grayscale photo of a {}."],
    "photo+gray+product": ["a photo of a {}.", "a grayscale photo of a {}.",
                           "a black and white photo of a {}.", "a product photo of a {}."],
}
NORMS = {"inception[-1,1]": (INCEPTION_MEAN, INCEPTION_STD),
         "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_test(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[..., None]
    y = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(y))[:n]
    return x[idx], y[idx]


def throughput(size: int, images: np.ndarray) -> tuple[float, float]:
    """(wall images/s, images per CPU-second of this process)."""
    vlm = create_vlm(VLMSpec(image_size=size, batch_size=64))
    vlm.encode_images(images[:64])  # warm-up, class embeddings
    t, c = time.perf_counter(), time.process_time()
    vlm.encode_images(images)
    return len(images) / (time.perf_counter() - t), len(images) / (time.process_time() - c)


def nearest_centroid_acc(emb: np.ndarray, y: np.ndarray) -> float:
    """Fit class means on the first half, classify the second half (information content)."""
    half = len(y) // 2
    cent = np.stack([emb[:half][y[:half] == c].mean(0) for c in range(len(CLASSES))])
    return float(((emb[half:] @ cent.T).argmax(1) == y[half:]).mean())


def probs_for(vlm, images: np.ndarray, size: int, invert: bool, norm: str) -> torch.Tensor:
    mean, std = NORMS[norm]
    saved = conse_mod.INCEPTION_MEAN, conse_mod.INCEPTION_STD
    conse_mod.INCEPTION_MEAN, conse_mod.INCEPTION_STD = mean, std
    assert vlm.image_size == size  # the classifier's "same" padding is built for this size
    vlm.invert = invert
    try:
        return torch.cat([vlm.class_probabilities(images[i:i + 64])
                          for i in range(0, len(images), 64)])
    finally:
        conse_mod.INCEPTION_MEAN, conse_mod.INCEPTION_STD = saved


def conse_embed(probs: torch.Tensor, class_emb: torch.Tensor, k: int) -> np.ndarray:
    p, i = probs.topk(k, dim=-1)
    w = p / p.sum(dim=-1, keepdim=True)
    e = torch.einsum("nk,nkd->nd", w, class_emb[i])
    return torch.nn.functional.normalize(e, dim=-1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=[112])
    ap.add_argument("--inverts", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--norms", nargs="+", default=["inception[-1,1]"], choices=list(NORMS))
    args = ap.parse_args()
    torch.manual_seed(0)
    x, y = load_test(args.n)
    print(f"threads={torch.get_num_threads()} n={len(y)}")
    if not args.skip_speed:
        for size in (112, 224):
            wall, cpu = throughput(size, x[:320])
            print(f"throughput {size}px batch 64: {wall:.1f} img/s wall, {cpu:.1f} img per "
                  f"CPU-second (load average {os.getloadavg()[0]:.1f})", flush=True)

    if args.skip_accuracy:
        return
    vlms = {size: create_vlm(VLMSpec(image_size=size)) for size in args.sizes}
    vlm = vlms[args.sizes[0]]
    cs = load_concept_set("clothing")
    class_emb = vlm.class_embeddings
    mats = {(ph, ts): class_matrix(vlm, CLASSES, tmpl, PHRASINGS[ph])
            for ph, (ts, tmpl) in itertools.product(PHRASINGS, TEMPLATE_SETS.items())}
    mats[("yaml", "yaml")] = class_matrix(vlm, CLASSES, cs.class_templates, cs.class_aliases)
    results = []
    for size, invert, norm in itertools.product(args.sizes, map(bool, args.inverts), args.norms):
        t = time.perf_counter()
        probs = probs_for(vlms[size], x, size, invert, norm)
        top1_names = np.array(vlm.class_names)[probs.argmax(-1).numpy()]
        common = {n: int((top1_names == n).sum()) for n in set(top1_names)}
        top = sorted(common.items(), key=lambda kv: -kv[1])[:5]
        print(f"\nsize={size} invert={invert} norm={norm} ({time.perf_counter() - t:.0f}s) "
              f"most frequent ImageNet top-1: {top}")
        for k in (5, 10, 20, 1000):
            emb = conse_embed(probs, class_emb, k)
            for (ph, ts), w in mats.items():
                acc = float(((emb @ w.T).argmax(1) == y).mean())
                results.append((acc, size, invert, norm, k, ph, ts))
            best = max(r for r in results if r[1:5] == (size, invert, norm, k))
            print(f"  k={k:2d} best zero-shot acc {best[0]:.3f} ({best[5]}, {best[6]}); "
                  f"nearest-centroid (1000/1000 split) {nearest_centroid_acc(emb, y):.3f}",
                  flush=True)
    results.sort(reverse=True)
    print("\nTop 12 configurations (acc, size, invert, norm, top_k, phrasing, templates):")
    for r in results[:12]:
        print("  ", f"{r[0]:.3f}", *r[1:])
    for size, invert in itertools.product(args.sizes, map(bool, args.inverts)):
        print(f"\nsize={size} invert={invert}, inception, k=10 by phrasing/templates:")
        for r in results:
            if r[1:5] == (size, invert, "inception[-1,1]", 10):
                print("  ", f"{r[0]:.3f}", r[5], r[6])


if __name__ == "__main__":
    main()
