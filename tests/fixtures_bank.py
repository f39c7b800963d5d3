"""Bank fixtures shared by the whole suite (registered in the root conftest.py): the shipped
demo bank, and one tiny bank built once per session through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_BANK = REPO / "banks" / "demo"


@pytest.fixture(scope="session")
def demo_bank_path() -> Path:
    assert (DEMO_BANK / "manifest.json").is_file(), "the shipped demo bank is missing"
    return DEMO_BANK


# ---- one tiny bank built through the real CLI, shared by every build test of the session ----

# A small evaluation setting: 300 test images (not the 10,000 of the official test split),
# few attacks and shifts, 30 bootstrap resamples. A build takes seconds to a minute, not the
# demo's minutes, and exercises every stage.
TINY_CONFIG: dict[str, Any] = {
    "name": "tiny-e2e",
    "data": {"source": "fashion_mnist"},
    "splits": {"seed": 0, "classifier_train": 3000, "fit": 200, "reference": 300,
               "calibration": 300, "test": 300},
    # 3 epochs: 1 left the tiny classifier between 23% and 42% (thread-order noise)
    "train": {"epochs": 3, "widths": [8, 16, 16, 32]},
    "vlm": {"backend": "conse", "image_size": 64, "top_k": 10},
    "adversarial": {"attacks": [{"kind": "fgsm", "eps": 0.05, "steps": 1},
                                {"kind": "pgd", "eps": 0.05, "steps": 5},
                                {"kind": "apgd", "eps": 0.05, "steps": 5}],
                    "fit_attacks": [{"kind": "fgsm", "eps": 0.05, "steps": 1},
                                    {"kind": "pgd_l2", "eps": 1.0, "steps": 5}],
                    "per_split": 80, "fit_per_attack": 60},
    "shifts": {"kinds": ["gaussian_noise", "contrast", "occlusion"], "fit_per_kind": 60,
               "test_per_kind": 80},
    "foreign": {"fit_sets": ["shapes", "noise"], "test_sets": ["digits", "shapes"],
                "fit_per_set": 60, "test_per_set": 80},
    "calibration": {"folds": 3},
    "evaluation": {"vlm_test_images": 100, "bootstrap": 30,
                   "mixed": {"clean": 200, "corruption": 60, "attack": 40, "foreign": 40}},
}


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess:
    """``conceptguard ARGS`` as a subprocess of this interpreter (offline, text output)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "offline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class TinyBuild:
    """The session's tiny bank: its config file (classifier and cache paths filled in), the
    bank folder and the work folder holding both. Tests must not modify the bank; copy it."""

    config: Path
    bank: Path
    workdir: Path


def _build_tiny(workdir: Path) -> TinyBuild:
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_CONFIG, "classifier": {"path": str(workdir / "clf.safetensors")},
           "cache_dir": str(workdir / "cache")}
    cfg_path = workdir / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    r = run_cli("train-demo", "--config", str(cfg_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["test_accuracy"] > 0.3
    r = run_cli("build-bank", "--config", str(cfg_path), "--out", str(workdir / "bank"))
    assert r.returncode == 0, r.stderr[-3000:]
    return TinyBuild(cfg_path, workdir / "bank", workdir)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> TinyBuild:
    """train-demo + build-bank on :data:`TINY_CONFIG`, once per session. Under pytest-xdist
    the workers share one build: the first to arrive builds it in the run's common temporary
    folder while the others wait on a file lock."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _build_tiny(tmp_path_factory.mktemp("tiny-build"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, common to the workers
    workdir = shared / "tiny-build"
    with FileLock(str(shared / "tiny-build.lock")):
        done = workdir / "built"
        if done.is_file():
            return TinyBuild(workdir / "tiny.yaml", workdir / "bank", workdir)
        build = _build_tiny(workdir)
        done.write_text("ok")
        return build


def as_schema2(bank: Path) -> Path:
    """Rewrite the bank folder ``bank`` (a copy) as a schema-version-2 bank, as written before
    trust's calibration map and the operating curve existed: no ``trust.calibration.*``
    tensors, ``threshold.value`` the raw threshold, no ``threshold.raw`` and no curve;
    checksums refreshed."""
    from safetensors.numpy import load_file

    from conceptguard import bank as bankio

    tensors = {k: v for k, v in load_file(str(bank / bankio.TENSORS)).items()
               if not k.startswith("trust.calibration.")}
    bankio.write_tensors(bank, tensors)
    raw = json.loads((bank / bankio.MANIFEST).read_text())
    raw["schema_version"] = 2
    threshold = raw["threshold"]
    threshold["value"] = threshold.pop("raw", threshold["value"])
    threshold.pop("scale", None)
    raw["calibration"].pop("operating_curve", None)
    bankio.write_manifest(bank, bankio.Manifest.model_validate(raw))
    return bank
