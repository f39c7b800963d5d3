"""Write a small image folder to try conceptguard on: Fashion-MNIST images as PNG files.

Two folders in the torchvision ImageFolder layout (``<out>/<class>/<n>.png``): ``--out``, the
images the monitor is built and evaluated on (from the official test set), and
``--train-out``, separate images to train a classifier on (from the training set), so the
monitor never sees the classifier's training images. Class folders are the Fashion-MNIST
class names with ``/`` replaced by ``-``. Reads the local Fashion-MNIST files (Debian's
dataset-fashion-mnist, or ``--root``); downloads nothing.

    python scripts/make_example_folder.py --out data/example --per-class 100 \\
        --train-out data/example-train --train-per-class 500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def folder_name(cls: str) -> str:
    return cls.replace("/", "-")


def write_folder(images: np.ndarray, labels: np.ndarray, classes: list[str], out: Path,
                 per_class: int, seed: int) -> int:
    """``per_class`` seeded images of each class as PNG files under ``out/<class>/``."""
    rng = np.random.default_rng(seed)
    written = 0
    for c, cls in enumerate(classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {cls!r} has {len(members)} images, fewer than {per_class}")
        folder = out / folder_name(cls)
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.sort(rng.choice(members, size=per_class, replace=False)):
            Image.fromarray(images[i].squeeze(-1)).save(folder / f"{i:05d}.png")
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the monitor's image folder")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--train-out", type=Path, default=None,
                   help="also a folder of training images for the classifier")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--root", type=Path, default=None, help="Fashion-MNIST files (default: "
                   "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from conceptguard.data.fashion_mnist import load_fashion_mnist

    for path in filter(None, (args.out, args.train_out)):
        if path.exists() and any(path.iterdir()):
            print(f"make_example_folder: {path} exists and is not empty", file=sys.stderr)
            return 2
    try:
        train, test = load_fashion_mnist(args.root)
        n = write_folder(test.images, test.labels, test.classes, args.out, args.per_class,
                         args.seed)
        print(f"{args.out}: {n} images in {len(test.classes)} classes")
        if args.train_out is not None:
            n = write_folder(train.images, train.labels, train.classes, args.train_out,
                             args.train_per_class, args.seed)
            print(f"{args.train_out}: {n} images in {len(train.classes)} classes")
    except (ValueError, FileNotFoundError) as exc:
        print(f"make_example_folder: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
