"""The offline job end to end on a small subset, through the real CLI: train, build-bank,
report; the cache makes a re-run cheap and a changed input invalidates it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conceptguard.bank import load_bank
from tests.fixtures_bank import TinyBuild, run_cli
from tests.metrics_keys import missing_keys

pytestmark = pytest.mark.slow  # the session's tiny bank, then two more builds through the CLI


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def built(tiny_build: TinyBuild, workdir: Path) -> tuple[Path, Path]:
    """The session's tiny bank, copied: the report test below deletes one of its files."""
    shutil.copytree(tiny_build.bank, workdir / "bank")
    return tiny_build.config, workdir / "bank"


def test_end_to_end_run_is_complete(built) -> None:
    _, bank_dir = built
    metrics = json.loads((bank_dir / "report" / "metrics.json").read_text())
    assert missing_keys(metrics) == []
    bank = load_bank(bank_dir)
    assert bank.manifest.name == "tiny-e2e"
    assert bank.manifest.data["splits"]["test"] == 300
    # what diagnose and inject-faults check the data they read against
    from conceptguard.data import check_same_data, load_source, make_splits
    from offline.config import load_config

    cfg = load_config(built[0])
    train, test = load_source(cfg.data)
    splits = make_splits(len(train), len(test), cfg.splits)
    assert len(bank.manifest.data["sample_digest"]) == 64
    check_same_data(bank.manifest.data, train, test, splits, cfg.data.root)  # the same data
    assert bank.fused_onnx_path == bank_dir / "monitor.onnx"  # checked against score()
    assert "fused_graph" in bank.manifest.timings_s
    for png in ("model_ok.png", "model_diff.png", "vlm_ok.png", "auroc.png"):
        assert (bank_dir / "report" / png).stat().st_size > 5000
    html = (bank_dir / "report" / "index.html").read_text()
    assert "Misclassification detection" in html and "model_diff.png" in html


def test_rerun_uses_the_cache_and_a_changed_input_invalidates_it(built, workdir) -> None:
    cfg_path, _ = built
    r = run_cli("build-bank", "--config", str(cfg_path), "--out", str(workdir / "bank2"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert " 0 misses" in r.stdout + r.stderr
    # a changed input (fewer attacked test images) misses what depends on it and only that:
    # the features, VLM embeddings and fitting stream of the unchanged splits still hit
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["adversarial"]["per_split"] -= 10
    changed = workdir / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    r = run_cli("build-bank", "--config", str(changed), "--out", str(workdir / "bank3"))
    assert r.returncode == 0, r.stderr[-2000:]
    hits, misses = map(int, re.search(r"cache: (\d+) hits, (\d+) misses",
                                      r.stdout + r.stderr).groups())
    assert 0 < misses < hits, (hits, misses)


def test_report_command_rerenders(built) -> None:
    _, bank_dir = built
    png = bank_dir / "report" / "model_ok.png"
    png.unlink()
    r = run_cli("report", str(bank_dir))
    assert r.returncode == 0, r.stderr
    assert png.is_file()
    for name in ("roc.png", "risk_coverage.png", "reliability.png", "ex_misclassified_0.png"):
        assert (bank_dir / "report" / name).is_file(), name
    assert "Verdict" in (bank_dir / "report" / "index.html").read_text()


def test_bad_config_exits_with_a_clear_message(workdir: Path) -> None:
    bad = workdir / "bad.yaml"
    bad.write_text("splits: {fit: -1, reference: 1, calibration: 1}\n")
    r = run_cli("build-bank", "--config", str(bad), "--out", str(workdir / "x"),
)
    assert r.returncode == 2
    assert "invalid" in r.stderr and "fit" in r.stderr
    assert not (workdir / "x").exists()
