"""``build-bank --engine ray`` (the per-image stages on Ray Data, local Ray with 2 CPUs) builds
the same bank as the single-process build from a small fixture: the same tensor names, the
same values within float tolerance, the same threshold, and bit-identical adversarial images.

Tolerance: every tensor within 5e-4 of the local build's, relative to the tensor's largest
magnitude (at least 1); the threshold within 5e-5. The per-image stages run with one thread
per Ray task and with the runtime's default threads locally, which changes float32 sums in
the last bits (measured on 2 cores: VLM embeddings up to 6e-7 apart, bank tensors up to
4.2e-5 relative (the trust model's weights), thresholds 2e-6). The concept Mahalanobis
whitening matrix is compared through ``W @ W.T`` (the precision it encodes): a whitening is
defined up to a rotation, and near-equal eigenvalues rotate it freely under such noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # builds two banks, one on a local Ray

pytest.importorskip("ray")

SMALL = {
    "name": "engine-check",
    "data": {"source": "fashion_mnist"},
    "splits": {"seed": 0, "classifier_train": 1500, "fit": 100, "reference": 150,
               "calibration": 150, "test": 150},
    "train": {"epochs": 2, "widths": [8, 16, 16, 32]},
    "vlm": {"backend": "conse", "image_size": 64, "top_k": 10},
    # two families of each kind: leave-one-family-out refits need one left to fit on
    "adversarial": {"attacks": [{"kind": "pgd", "eps": 0.05, "steps": 2}],  # random starts
                    "fit_attacks": [{"kind": "fgsm", "eps": 0.05, "steps": 1},
                                    {"kind": "pgd_l2", "eps": 1.0, "steps": 2}],
                    "per_split": 40, "fit_per_attack": 40},
    "shifts": {"kinds": ["gaussian_noise", "contrast"], "fit_per_kind": 40,
               "test_per_kind": 40},
    "foreign": {"fit_sets": ["shapes", "noise"], "test_sets": ["digits"], "fit_per_set": 40,
                "test_per_set": 40},
    "calibration": {"folds": 3},
    "evaluation": {"vlm_test_images": 50, "bootstrap": 20,
                   "mixed": {"clean": 100, "corruption": 30, "attack": 20, "foreign": 20}},
}
RTOL = 5e-4


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "offline.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same config built twice, each with its own (empty) cache: local, then Ray."""
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for engine in ("local", "ray"):
        cfg = {**SMALL, "classifier": {"path": str(root / "clf.safetensors")},
               "cache_dir": str(root / f"cache-{engine}")}
        path = root / f"{engine}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if engine == "local":
            r = _cli("train-demo", "--config", str(path))
            assert r.returncode == 0, r.stderr[-3000:]
        r = _cli("build-bank", "--config", str(path), "--out", str(root / engine), "--quiet",
                 "--engine", engine, "--workers", "2")
        assert r.returncode == 0, r.stderr[-3000:]
        out[engine] = root / engine
    out["root"] = root
    return out


def _close(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max(1, max |a|)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(a).max())) if a.size else 0.0


def test_ray_engine_builds_the_same_bank(banks: dict[str, Path]) -> None:
    from conceptguard.bank import load_bank

    local, ray_ = load_bank(banks["local"]), load_bank(banks["ray"])
    assert sorted(local.tensors) == sorted(ray_.tensors)
    worst = {}
    for name, a in local.tensors.items():
        b = ray_.tensors[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name.endswith(".whiten"):
            a, b = a.astype(np.float64) @ a.T, b.astype(np.float64) @ b.T
        worst[name] = _close(a, b)
    assert max(worst.values()) <= RTOL, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    assert abs(local.monitor.threshold - ray_.monitor.threshold) <= 5e-5
    ml = json.loads((banks["local"] / "report" / "metrics.json").read_text())
    mr = json.loads((banks["ray"] / "report" / "metrics.json").read_text())
    assert ml["classifier"] == mr["classifier"]
    for task in ml["adversarial"]:
        assert abs(ml["adversarial"][task]["trust"]["auroc"]
                   - mr["adversarial"][task]["trust"]["auroc"]) <= 1e-3
    assert set(ml["timings_s"]) == set(mr["timings_s"])


def test_ray_engine_computes_the_same_per_image_outputs(banks: dict[str, Path]) -> None:
    """The cached per-image outputs under the same keys: attacks bit-identical (seeded per
    attack batch, whichever worker ran it), torch features and VLM embeddings within float
    tolerance."""
    from safetensors.numpy import load_file

    local_cache, ray_cache = banks["root"] / "cache-local", banks["root"] / "cache-ray"
    names = sorted(p.name for p in local_cache.glob("*.safetensors"))
    assert names == sorted(p.name for p in ray_cache.glob("*.safetensors"))
    kinds = {n.split("-")[0] for n in names}
    assert {"adversarial", "classifier", "vlm"} <= kinds
    for name in names:
        a, b = load_file(str(local_cache / name)), load_file(str(ray_cache / name))
        for key in a:
            if name.startswith("adversarial"):
                assert np.array_equal(a[key], b[key]), name
            else:
                np.testing.assert_allclose(b[key], a[key], atol=1e-5, err_msg=name)
