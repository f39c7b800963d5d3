"""The offline job end to end on a small subset, through the real CLI: train, build-bank,
report; the cache makes a re-run cheap and a changed input invalidates it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conceptguard.bank import load_bank
from tests.metrics_keys import missing_keys

pytestmark = pytest.mark.slow  # trains a classifier and builds three banks through the CLI

TINY = {
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


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "offline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def built(workdir: Path) -> tuple[Path, Path, float]:
    repo = Path(__file__).resolve().parents[1]
    cfg = {**TINY, "classifier": {"path": str(workdir / "clf.safetensors")},
           "cache_dir": str(workdir / "cache")}
    cfg_path = workdir / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    r = _cli("train-demo", "--config", str(cfg_path), cwd=repo)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["test_accuracy"] > 0.3
    r = _cli("build-bank", "--config", str(cfg_path), "--out", str(workdir / "bank"), cwd=repo)
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg_path, workdir / "bank"


def test_end_to_end_run_is_complete(built) -> None:
    _, bank_dir = built
    metrics = json.loads((bank_dir / "report" / "metrics.json").read_text())
    assert missing_keys(metrics) == []
    bank = load_bank(bank_dir)
    assert bank.manifest.name == "tiny-e2e"
    assert bank.manifest.data["splits"]["test"] == 300
    assert bank.fused_onnx_path == bank_dir / "monitor.onnx"  # checked against score()
    assert "fused_graph" in bank.manifest.timings_s
    for png in ("model_ok.png", "model_diff.png", "vlm_ok.png", "auroc.png"):
        assert (bank_dir / "report" / png).stat().st_size > 5000
    html = (bank_dir / "report" / "index.html").read_text()
    assert "Misclassification detection" in html and "model_diff.png" in html


def test_rerun_uses_the_cache_and_a_changed_input_invalidates_it(built, workdir) -> None:
    cfg_path, _ = built
    repo = Path(__file__).resolve().parents[1]
    r = _cli("build-bank", "--config", str(cfg_path), "--out", str(workdir / "bank2"), cwd=repo)
    assert r.returncode == 0, r.stderr[-2000:]
    assert " 0 misses" in r.stdout + r.stderr
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["splits"]["seed"] = 1
    changed = workdir / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    r = _cli("build-bank", "--config", str(changed), "--out", str(workdir / "bank3"),
             "--quiet", cwd=repo)
    assert r.returncode == 0, r.stderr[-2000:]
    assert " 0 misses" not in r.stdout + r.stderr


def test_report_command_rerenders(built) -> None:
    _, bank_dir = built
    png = bank_dir / "report" / "model_ok.png"
    png.unlink()
    r = _cli("report", str(bank_dir), cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert png.is_file()
    for name in ("roc.png", "risk_coverage.png", "reliability.png", "ex_misclassified_0.png"):
        assert (bank_dir / "report" / name).is_file(), name
    assert "Verdict" in (bank_dir / "report" / "index.html").read_text()


def test_bad_config_exits_with_a_clear_message(workdir: Path) -> None:
    bad = workdir / "bad.yaml"
    bad.write_text("splits: {fit: -1, reference: 1, calibration: 1}\n")
    r = _cli("build-bank", "--config", str(bad), "--out", str(workdir / "x"),
             cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2
    assert "invalid" in r.stderr and "fit" in r.stderr
    assert not (workdir / "x").exists()
