"""What a build writes for trust's calibration (the session's tiny bank): the map and the raw
threshold in the bank, the operating curve, the ``trust_calibration`` section of
metrics.json and the report, and the map keeping every decision and ranking of the raw score."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conceptguard.bank import load_bank
from conceptguard.calibration import MAP_CLEAN_SHARES, CalibrationSpec
from conceptguard.metrics import auroc
from conceptguard.operating_point import COLUMNS, curve_array
from conceptguard.scoring import IDENTITY, score
from conceptguard.trust_map import check_knots
from tests.fixtures_bank import TinyBuild

pytestmark = pytest.mark.slow  # the session's tiny bank


def test_bank_carries_the_map_the_raw_threshold_and_the_curve(tiny_build: TinyBuild) -> None:
    bank = load_bank(tiny_build.bank)
    m, mon = bank.manifest, bank.monitor
    assert m.schema_version == 3
    assert check_knots(mon.calibration.x, mon.calibration.y) is None
    assert not mon.calibration.is_identity
    assert mon.threshold == m.threshold["raw"]
    assert mon.calibrated_threshold == m.threshold["value"]
    curve = curve_array(m.calibration["operating_curve"])
    assert 2 <= len(curve) <= 257 and curve.shape[1] == len(COLUMNS)  # 256 + the build's
    assert (np.diff(curve[:, 0]) > 0).all() and (np.diff(curve[:, 1]) > 0).all()
    # the build's threshold is a point of the curve it chose it from
    assert mon.threshold in curve[:, 0].tolist()


def test_the_map_keeps_every_decision_and_ranking(tiny_build: TinyBuild) -> None:
    from conceptguard.classifier.inference import to_tensor
    from conceptguard.data import DataSpec, load_source
    from conceptguard.runtime import OnnxRuntime

    bank = load_bank(tiny_build.bank)
    _, test = load_source(DataSpec())
    images = test.images[:400].astype(np.float64)
    noisy = np.random.default_rng(0).normal(0, 60, images.shape)  # a shifted half
    images[200:] = np.clip(images[200:] + noisy[200:], 0, 255)
    o = OnnxRuntime(bank.onnx_path, device="cpu").run(to_tensor(images.astype(np.uint8)).numpy())
    got = score(bank.monitor, o.logits, o.features, o.concepts)
    ref = score(dataclasses.replace(bank.monitor, calibration=IDENTITY), o.logits,
                o.features, o.concepts)
    assert 0 < got.reject.sum() < len(got)  # both decisions occur
    np.testing.assert_array_equal(got.reject, ref.reject)
    np.testing.assert_array_equal(got.reject, got.trust < bank.monitor.calibrated_threshold)
    order = np.argsort(ref.trust, kind="mergesort")
    assert (np.diff(got.trust[order]) >= 0).all()
    wrong = got.predictions != test.labels[:400]
    assert auroc(1 - got.trust, wrong) == auroc(1 - ref.trust, wrong)


def test_metrics_and_report_hold_the_calibration_section(tiny_build: TinyBuild) -> None:
    report = tiny_build.bank / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    sec = metrics["trust_calibration"]
    for kind in ("clean", "corruption", "attack", "foreign", "fitting_stream"):
        e = sec["ece"][kind]
        assert 0.0 <= e["calibrated"] <= 1.0 and e["n"] > 0, kind
    chk = sec["reject_target_heldout"]
    assert chk["target"] == "accept_correct" and chk["ci95"][0] <= chk["measured"] <= \
        chk["ci95"][1]
    rows = sec["estimated_accuracy"]
    assert {"clean", "corruption/contrast", "attack/pgd_eps0.05", "foreign/digits"} <= set(rows)
    clean = rows["clean"]
    assert clean["error"] == pytest.approx(clean["estimated"] - clean["realised"], abs=2e-4)
    if "version" in sec["cbpe"]:  # nannyml installed: CBPE beside every stream
        assert all("cbpe" in r for r in rows.values())
    page = (report / "index.html").read_text()
    assert "Trust as P(right)" in page and "estimated_accuracy.png" in page
    # the map's clean share: one of the candidates, the smallest worse ECE of its table
    fitted_map = metrics["calibration"]["trust_map"]
    table = fitted_map["clean_share_selection"]
    assert set(table) == {f"{x:g}" for x in MAP_CLEAN_SHARES}
    worst = {k: max(v["ece_clean"], v["ece_stream"]) for k, v in table.items()}
    assert worst[f"{fitted_map['clean_share']:g}"] == min(worst.values())
    assert "clean share" in page
    assert metrics["calibration"]["threshold_confidence"] == CalibrationSpec().confidence
    assert (report / "estimated_accuracy.png").stat().st_size > 5000
    assert metrics["threshold"]["value"] == pytest.approx(
        load_bank(tiny_build.bank).monitor.calibrated_threshold, abs=1e-4)
