"""Peak RSS of ``conceptguard build-bank`` against the dataset size (it must stay flat).

For each N, an image folder of N distinct 28x28 greyscale PNGs in 10 class folders
(``train/`` a quarter of N, at least 4,000; ``test/`` the rest: the test split is
``test: null``, so it grows with N) is generated once (Fashion-MNIST images, each copy with
its own seeded random shift and noise) under ``--root`` and reused; then the real CLI builds a
bank over it with a small but complete config (1000/1000/1000 fit/reference/calibration, one
attack evaluated and two fitted, two corruptions, one foreign set per side, the demo ResNet,
the ConSE VLM) in a child process, cache off. The child's peak RSS is its ``ru_maxrss``
(``os.wait4``, one child per run).

    PYTHONPATH=. python benchmarks/build_memory.py --sizes 20000,50000,200000

prints JSON: per N the peak RSS (MiB), the wall time and the images/s of the build, then
``peak_ratio_last_over_first`` (peak at the largest N over the smallest).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_ROOT = REPO / ".cache" / "build-memory"
CLASS_FOLDERS = ["0_tshirt", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal",
                 "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot"]
DONE = ".complete"


def generate_folder(folder: Path, n: int, seed: int = 0) -> Path:
    """``folder/{train,test}/<class>/<i>.png``: n distinct 28x28 grey PNGs (reused when
    ``folder/.complete`` says it holds n images)."""
    from PIL import Image

    from conceptguard.data import DataSpec, load_source

    marker = folder / DONE
    if marker.is_file() and marker.read_text().strip() == str(n):
        return folder
    source, _ = load_source(DataSpec())  # Fashion-MNIST train: 60,000 images
    rng = np.random.default_rng(seed)
    n_train = min(n - 1, max(4000, n // 4))  # the monitor pool needs 3000
    for i in range(n):
        k = int(rng.integers(len(source)))
        img = source.images[k, :, :, 0].astype(np.int16)
        dy, dx = rng.integers(-2, 3, 2)
        img = np.roll(img, (int(dy), int(dx)), axis=(0, 1))
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        split = "train" if i < n_train else "test"
        path = folder / split / CLASS_FOLDERS[int(source.labels[k])] / f"{i:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(path, optimize=False)
    marker.write_text(str(n))
    return folder


def config(folder: Path, cache: Path, bootstrap: int) -> dict:
    from conceptguard.data.fashion_mnist import FASHION_MNIST_CLASSES

    fgsm = {"kind": "fgsm", "eps": 0.05, "steps": 1}
    return {
        "name": "build-memory",
        "data": {"source": "image_folder", "root": str(folder), "image_size": 28,
                 "channels": 1},
        "splits": {"seed": 0, "fit": 1000, "reference": 1000, "calibration": 1000,
                   "test": None},
        "classifier": {"path": str(REPO / "models" / "demo-resnet.safetensors")},
        "vlm": {"backend": "conse", "image_size": 64, "top_k": 10},
        "concepts": "clothing",
        "class_prompts": list(FASHION_MNIST_CLASSES),
        # two fitting families: fitting leaves each out in turn
        "adversarial": {"attacks": [fgsm], "heatmap_attack": fgsm,
                        "fit_attacks": [fgsm, {"kind": "pgd_l2", "eps": 1.0, "steps": 5}],
                        "per_split": 200, "fit_per_attack": 200},
        "shifts": {"kinds": ["gaussian_noise", "contrast"], "fit_per_kind": 200,
                   "test_per_kind": 200},
        "foreign": {"fit_sets": ["noise"], "test_sets": ["shapes"], "fit_per_set": 200,
                    "test_per_set": 200},
        "calibration": {"folds": 3},
        "evaluation": {"vlm_test_images": 200, "vlm_misclassified_max": 500,
                       "bootstrap": bootstrap,
                       "mixed": {"clean": 500, "corruption": 200, "attack": 100,
                                 "foreign": 100}},
        "cache_dir": str(cache),
    }


def measure(folder: Path, n: int, work: Path, bootstrap: int) -> dict:
    cfg_path = work / f"build-{n}.yaml"
    cfg_path.write_text(yaml.safe_dump(config(folder, work / f"cache-{n}", bootstrap)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    log = (work / f"build-{n}.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "offline.cli", "build-bank", "--config",
                             str(cfg_path), "--out", str(work / f"bank-{n}"), "--no-cache",
                             "--quiet"], cwd=REPO, env=env, stdout=log, stderr=log)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (work / f"build-{n}.log").read_text()[-3000:]
        raise RuntimeError(f"build-bank over {n} images failed ({proc.returncode}):\n{tail}")
    metrics = json.loads((work / f"bank-{n}" / "report" / "metrics.json").read_text())
    return {"images": n, "n_test": metrics["classifier"]["n_test"],
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1),
            "images_per_s": round(n / wall, 1),
            "test_accuracy": metrics["classifier"]["test_accuracy"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,50000,200000")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                   help="where the generated folders are kept (reused)")
    p.add_argument("--bootstrap", type=int, default=50, help="resamples behind each ci95")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cg-build-memory-") as tmp:
        for n in sizes:
            t0 = time.perf_counter()
            folder = generate_folder(args.root / f"folder-{n}", n)
            print(f"folder {n}: ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            rows.append(measure(folder, n, Path(tmp), args.bootstrap))
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"cores_on_host": os.cpu_count(), "rows": rows,
              "peak_ratio_last_over_first": round(rows[-1]["peak_rss_mib"]
                                                  / rows[0]["peak_rss_mib"], 3)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
