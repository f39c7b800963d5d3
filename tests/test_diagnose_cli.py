"""`conceptguard diagnose` and `--repair` through the real CLI on the demo bank with a small
data config (600 reference and 600 test inputs): the bank's own classifier, a head fault and
an encoder fault; and bad input (other classes, wrong input shape, corrupt or foreign file,
a repair path that is not safetensors), each one line on stderr and exit status 2 with
nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from conceptguard.classifier.inference import predict
from conceptguard.classifier.io import (
    ClassifierSpec,
    build_classifier,
    load_classifier,
    save_classifier,
)
from conceptguard.faults import encoder_ablate, head_swap
from tests.conftest import DEMO_BANK

REPO = Path(__file__).resolve().parents[1]
PAIR_KEYS = {"true", "predicted", "errors", "new_errors", "changed", "limit", "evidence",
             "concepts", "repair"}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot"]
TROUSER, BAG = 1, 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("diagnose")
    cfg = {"name": "tiny-diagnose", "seed": 0, "data": {"source": "fashion_mnist"},
           "splits": {"seed": 0, "fit": 100, "reference": 600, "calibration": 100,
                      "test": 600},
           "cache_dir": str(d / "cache")}
    (d / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "offline.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def _diagnose(workdir: Path, out: str, *extra: str) -> dict:
    r = _cli("diagnose", "--bank", str(DEMO_BANK), "--config", str(workdir / "tiny.yaml"),
             "--out", str(workdir / out), "--no-paper-rule", "--quiet", "--min-errors", "3",
             *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((workdir / out / "diagnosis.json").read_text())


@pytest.mark.slow
def test_bank_classifier_diagnosis_and_repair(workdir: Path) -> None:
    repaired = workdir / "repaired.safetensors"
    d = _diagnose(workdir, "own", "--repair", str(repaired))
    c = d["classifier"]
    assert c["is_bank_classifier"] and c["changed"] == "none" and c["new_errors"] == 0
    assert c["fixed_by"] == "none" and c["fixed_errors"] == 0
    assert d["pairs"], "the demo classifier confuses some pairs on 600 test images"
    for p in d["pairs"]:
        assert set(p) >= PAIR_KEYS
        assert p["changed"] == "none" and p["new_errors"] == 0
        assert p["limit"] in {"head", "encoder", "abstain"}
        g = p["evidence"]["geometry"]
        assert 0.5 <= g["probe_accuracy"] <= 1 and 0 <= g["head_accuracy"] <= 1
        assert p["errors"] >= 3
        if not p["concepts"]:
            assert p["concepts_unavailable"]
    assert (workdir / "own" / "diagnosis.png").stat().st_size > 5000
    page = (workdir / "own" / "diagnosis.html").read_text()
    assert "Confused pairs" in page and "diagnosis.png" in page
    # the repaired file: the bank's encoder, a new head, and the accuracy the JSON reports
    bank_model, _, _ = load_classifier(DEMO_BANK / "classifier.safetensors")
    model, spec, _ = load_classifier(repaired)
    assert spec.classes == CLASSES
    for (name, a), (_, b) in zip(bank_model.encoder.state_dict().items(),
                                 model.encoder.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(bank_model.head.weight, model.head.weight)
    from conceptguard.data import DataSpec, load_source, make_splits
    from offline.config import load_config

    cfg = load_config(workdir / "tiny.yaml")
    train, test = load_source(DataSpec())
    idx = make_splits(len(train), len(test), cfg.splits).test
    acc = float((predict(model, test.images[idx])[0].argmax(1) == test.labels[idx]).mean())
    assert abs(acc - d["repair"]["accuracy_after"]) <= 1.0 / len(idx) + 1e-9


@pytest.mark.slow
def test_a_head_fault_is_attributed_to_the_head_and_fixed_by_the_repair(workdir: Path
                                                                        ) -> None:
    model, spec, _ = load_classifier(DEMO_BANK / "classifier.safetensors")
    swapped, _ = head_swap(model, TROUSER, BAG)
    save_classifier(swapped, spec, workdir / "swapped.safetensors")
    d = _diagnose(workdir, "swapped", "--classifier", str(workdir / "swapped.safetensors"))
    assert d["classifier"]["changed"] == "head" and d["classifier"]["new_errors"] > 80
    # what the swap fixed (inputs the bank's head got wrong between the two classes) is
    # fixed by the head too: the encoder did not change
    assert d["classifier"]["evidence"]["fixed"]["encoder_share"] == 0.0
    assert d["classifier"]["fixed_by"] in ("head", "none")
    pairs = {(p["true"], p["predicted"]): p for p in d["pairs"]}
    p = pairs[("Trouser", "Bag")]
    assert p["changed"] == "head" and p["evidence"]["changed"]["head_share"] == 1.0
    assert p["limit"] == "head"
    assert p["repair"]["fixed"] and p["repair"]["recovered"] >= 0.9
    assert p["repair"]["agrees_with_limit"] is True


@pytest.mark.slow
def test_an_encoder_fault_is_attributed_to_the_encoder(workdir: Path) -> None:
    model, spec, _ = load_classifier(DEMO_BANK / "classifier.safetensors")
    ablated, _ = encoder_ablate(model, "layer3", 0.9, seed=0)
    save_classifier(ablated, spec, workdir / "ablated.safetensors")
    d = _diagnose(workdir, "ablated", "--classifier", str(workdir / "ablated.safetensors"),
                  "--top-pairs", "3")
    c = d["classifier"]
    assert c["changed"] == "encoder" and c["evidence"]["head_shift"] == 0.0
    assert c["evidence"]["head_share"] == 0.0 and c["evidence"]["encoder_share"] == 1.0
    assert all(p["changed"] in ("encoder", "none") for p in d["pairs"])


# ------------------------------------------------------------------ bad input


def _spec(**changes) -> ClassifierSpec:
    base = dict(arch="small_resnet", num_classes=10, in_channels=1, input_size=28,
                widths=[16, 32, 64, 128], mean=[0.2861], std=[0.3531], classes=CLASSES)
    return ClassifierSpec(**{**base, **changes})


def _bad(tmp_path: Path, capsys, *args: str) -> str:
    from offline.cli import main

    out = tmp_path / "out"
    code = main(["diagnose", "--bank", str(DEMO_BANK), "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("conceptguard diagnose: error:")
    assert not out.exists()
    return err


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    other = [f"class {i}" for i in range(10)]
    save_classifier(build_classifier(_spec(classes=other)), _spec(classes=other),
                    tmp_path / "other.safetensors")
    assert "classes" in _bad(tmp_path, capsys, "--classifier",
                             str(tmp_path / "other.safetensors"))
    three = _spec(num_classes=3, classes=CLASSES[:3])
    save_classifier(build_classifier(three), three, tmp_path / "three.safetensors")
    assert "classes" in _bad(tmp_path, capsys, "--classifier",
                             str(tmp_path / "three.safetensors"))
    big = _spec(input_size=32)
    save_classifier(build_classifier(big), big, tmp_path / "big.safetensors")
    assert "input shape 1x32x32" in _bad(tmp_path, capsys, "--classifier",
                                         str(tmp_path / "big.safetensors"))
    rgb = _spec(in_channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    save_classifier(build_classifier(rgb), rgb, tmp_path / "rgb.safetensors")
    assert "input shape 3x28x28" in _bad(tmp_path, capsys, "--classifier",
                                         str(tmp_path / "rgb.safetensors"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((DEMO_BANK / "classifier.safetensors").read_bytes()[:5000])
    assert "corrupt.safetensors" in _bad(tmp_path, capsys, "--classifier", str(corrupt))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(foreign))
    assert "foreign.safetensors" in _bad(tmp_path, capsys, "--classifier", str(foreign))
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert "image.png" in _bad(tmp_path, capsys, "--classifier", str(png))
    assert "not found" in _bad(tmp_path, capsys, "--classifier",
                               str(tmp_path / "missing.safetensors"))
    assert "safetensors" in _bad(tmp_path, capsys, "--repair", str(tmp_path / "head.pt"))
    assert "bank" in _bad(tmp_path, capsys, "--bank", str(tmp_path / "nobank"))


def test_diagnose_and_repair_are_registered() -> None:
    from offline.cli import parser

    args = parser().parse_args(["diagnose", "--bank", "b", "--out", "o", "--repair",
                                "r.safetensors"])
    assert args.classifier is None and str(args.repair) == "r.safetensors"
    assert np.isclose(args.min_errors, 5)


@pytest.mark.parametrize(("argv", "says"), [
    (["diagnose", "--bank", "banks/demo", "--out", "x", "--test-limit", "-5"], "below 1"),
    (["diagnose", "--bank", "banks/demo", "--out", "x", "--top-pairs", "0"], "below 1"),
    (["inject-faults", "--seeds", "0"], "below 1"),
    (["inject-faults", "--test-n", "many"], "not an integer"),
    (["check-concepts", "banks/demo", "--threshold", "5"], "not between 0 and 1"),
    (["export-graph", "banks/demo", "--opset", "5"], "outside 13..20"),
])
def test_numbers_out_of_range_exit_2_naming_the_option(
        argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything runs (a diagnosis of 0 inputs wrote NaN into its JSON, a
    threshold of 5 rewrote the bank's competence check)."""
    from offline.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and argv[-2] in err and says in err, err


def test_a_candidates_pairs_put_what_it_broke_first() -> None:
    """An old hard pair (many errors, none new) no longer hides a pair the candidate broke;
    the bank's own classifier keeps the most frequent pairs."""
    from conceptguard.diagnosis import SwapPredictions
    from offline.diagnose import DiagnoseOptions, _pairs_to_diagnose

    y = np.array([0] * 30 + [2] * 10)
    ref = np.array([1] * 20 + [0] * 10 + [2] * 10)  # 0 -> 1 twenty times: an old hard pair
    cand = np.array([1] * 20 + [0] * 4 + [3] * 6 + [3] * 10)  # new: 0 -> 3 six, 2 -> 3 ten
    swap = SwapPredictions(ref, cand, cand, cand)
    opts = DiagnoseOptions(top_pairs=2, min_errors=5)
    assert _pairs_to_diagnose(y, swap, opts, same=True) == [(0, 1, 20), (2, 3, 10)]
    assert _pairs_to_diagnose(y, swap, opts, same=False) == [(2, 3, 10), (0, 3, 6)]


def test_other_data_under_the_banks_splits_is_refused(tmp_path: Path, capsys) -> None:
    """A bank records a sample of what its splits hold: diagnose on data that is not it
    (here: a record that no data matches, as when a relative data.root resolves in another
    folder) stops with one line naming the data, before any feature is computed."""
    import json
    import shutil

    from offline.cli import main

    bank = tmp_path / "bank"
    shutil.copytree(DEMO_BANK, bank, ignore=shutil.ignore_patterns("report"))
    manifest = json.loads((bank / "manifest.json").read_text())
    manifest["data"]["sample_digest"] = "0" * 64
    (bank / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    code = main(["diagnose", "--bank", str(bank), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "is not the data the bank was built on" in err and len(err.splitlines()) == 1
    assert not out.exists()
