"""Report rendering on its own: best values in bold, the verdict, and the curves and
thumbnails from per-input evidence (synthetic inputs scored by the demo bank's monitor)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conceptguard.scoring import score
from offline.report import _method_table, verdict_html, write_report
from offline.report_evidence import Evidence, Group


def test_best_value_per_column_is_bold() -> None:
    section = {"a": {"auroc": 0.9, "aurc": 0.2}, "b": {"auroc": 0.8, "aurc": 0.1},
               "n": 10}
    t = _method_table(section, ["auroc", "aurc"], {"aurc"})
    assert "<b>0.9000</b>" in t and "<b>0.1000</b>" in t
    assert "<b>0.8000</b>" not in t and "<b>0.2000</b>" not in t


def test_verdict_states_traffic_mixes_and_head_claims_with_intervals(demo_bank_dir: Path
                                                                     ) -> None:
    metrics = json.loads((demo_bank_dir / "report" / "metrics.json").read_text())
    v = verdict_html(metrics)
    acc = metrics["classifier"]["test_accuracy"]
    assert f"{acc:.2%}" in v
    assert f"{metrics['threshold']['coverage']:.1%}" in v
    streams = [int(x) for x in re.findall(
        r"(?:trust lower than every peer, interval of each difference below 0|not shown lower "
        r"than every peer) \((\d+)\)", v)]
    assert sum(streams) == len(metrics["summary_streams"]) >= 5  # mixed + 4 compositions
    heads = [int(x) for x in re.findall(
        r"(?:matches the comparator within 0.005 \(Holm-adjusted p &lt; 0.05\)|trails by more "
        r"than 0.005 \(whole interval\)|not decided) \((\d+)\)", v)]
    assert len(heads) == 3 and sum(heads) == len(metrics["summary"])
    assert "[" in v  # intervals


def _group(bank, name: str, n: int, rng: np.random.Generator, foreign: bool = False) -> Group:
    d = bank.manifest.dims
    s = score(bank.monitor, rng.normal(size=(n, d.classes)) * 3,
              np.abs(rng.normal(size=(n, d.features))), rng.normal(size=(n, d.concepts)))
    labels = np.full(n, -1) if foreign else rng.integers(0, d.classes, n)
    defect = np.ones(n, bool) if foreign else s.predictions != labels
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return Group(name, images, labels, s, defect)


@pytest.mark.slow  # renders every figure of a report
def test_write_report_with_evidence(demo_bank, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ev = Evidence(clean=_group(demo_bank, "clean test", 300, rng),
                  foreign=_group(demo_bank, "foreign", 40, rng, foreign=True),
                  corrupted=_group(demo_bank, "corrupted", 60, rng),
                  adversarial=_group(demo_bank, "adversarial", 30, rng, foreign=False),
                  notes=["synthetic"])
    ev.adversarial.defect[:] = True
    metrics = json.loads((demo_bank.path / "report" / "metrics.json").read_text())
    written = write_report(tmp_path, demo_bank.manifest, demo_bank.tensors, metrics, ev)
    names = {p.name for p in written}
    assert {"roc.png", "risk_coverage.png", "reliability.png", "index.html",
            "metrics.json"} <= names
    page = (tmp_path / "index.html").read_text()
    for src in re.findall(r"<img src='([^']+)'", page):
        assert (tmp_path / src).read_bytes()[:4] == b"\x89PNG", src
    for kind in ("misclassified", "rejected", "adversarial", "foreign"):
        assert f"ex_{kind}_0.png" in names, kind
    assert page.index("Verdict") < page.index("risk_coverage.png") < page.index("Summary")
    assert "concepts:" in page


@pytest.mark.slow  # renders every figure of a report
def test_write_report_without_evidence_still_works(demo_bank, tmp_path: Path) -> None:
    metrics = json.loads((demo_bank.path / "report" / "metrics.json").read_text())
    write_report(tmp_path, demo_bank.manifest, demo_bank.tensors, metrics)
    page = (tmp_path / "index.html").read_text()
    assert "Verdict" in page and "conceptguard report" in page
    assert not list(tmp_path.glob("ex_*.png"))


@pytest.mark.parametrize(("content", "says"), [('{"foo": 1}', "lacks what the report needs"),
                                               ("[]", "not a JSON object"),
                                               ("\n", "not readable JSON")])
def test_a_failed_rendering_leaves_the_report_as_it_was(
        demo_bank_dir: Path, tmp_path: Path, content: str, says: str) -> None:
    """``conceptguard report`` renders beside the report folder and swaps it in: a
    metrics.json it cannot use is named, and no thumbnail or page is touched."""
    import shutil

    from offline.cli import render_report

    bank = tmp_path / "bank"
    shutil.copytree(demo_bank_dir, bank)
    (bank / "report" / "metrics.json").write_text(content)
    before = {p.relative_to(bank): p.read_bytes() for p in (bank / "report").rglob("*")
              if p.is_file()}
    with pytest.raises(ValueError, match=rf"metrics\.json.*{says}|{says}"):
        render_report(bank, evidence=False)
    after = {p.relative_to(bank): p.read_bytes() for p in (bank / "report").rglob("*")
             if p.is_file()}
    assert after == before
    assert not [p.name for p in bank.iterdir() if p.name.startswith(".")]  # no staging


def test_rendering_keeps_a_symlinked_report_folder_and_refuses_the_working_folder(
        demo_bank_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from offline.cli import render_report

    bank = tmp_path / "bank"
    shutil.copytree(demo_bank_dir, bank)
    real = tmp_path / "real-report"
    shutil.move(bank / "report", real)
    (bank / "report").symlink_to(real)
    render_report(bank, evidence=False)
    assert (bank / "report").is_symlink() and (real / "index.html").is_file()
    assert not [p.name for p in [*bank.iterdir(), *tmp_path.iterdir()]
                if p.name.startswith(".")]  # nothing left beside either
    monkeypatch.chdir(real)
    with pytest.raises(ValueError, match="holds the current folder"):
        render_report(bank, tmp_path, evidence=False)
