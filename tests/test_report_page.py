"""The bank's report, served read-only by the service and opened in headless Chromium:
every image loads; the path is confined to the report folder."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, start_server

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)


@pytest.fixture(scope="module")
def report_server(tmp_path_factory: pytest.TempPathFactory):
    server = start_server(tmp_path_factory.mktemp("report-server"))
    yield server
    server.stop()


def test_report_redirects_to_its_page(report_server: ServerProcess) -> None:
    with report_server.client() as c:
        r = c.get("/v1/bank/report")
        assert r.status_code == 307
        assert r.headers["location"] == "report/index.html"
        page = c.get("/v1/bank/report", follow_redirects=True)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert str(page.url).endswith("/v1/bank/report/index.html")
    assert "Verdict" in page.text


def test_report_assets_and_types(report_server: ServerProcess) -> None:
    with report_server.client() as c:
        page = c.get("/v1/bank/report/index.html").text
        srcs = set(re.findall(r"<img src='([^']+)'", page))
        assert {"roc.png", "risk_coverage.png", "reliability.png"} <= srcs
        assert any(s.startswith("ex_adversarial_") for s in srcs)
        assert any(s.startswith("ex_foreign_") for s in srcs)
        for src in srcs:
            r = c.get(f"/v1/bank/report/{src}")
            assert r.status_code == 200, src
            assert r.headers["content-type"] == "image/png"
            assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
        m = c.get("/v1/bank/report/metrics.json")
        assert m.status_code == 200
        assert m.headers["content-type"].startswith("application/json")
        assert "summary" in m.json()


@pytest.mark.parametrize("path", [
    "/v1/bank/report/..%2Fmanifest.json",
    "/v1/bank/report/%2E%2E%2Fmanifest.json",
    "/v1/bank/report/../manifest.json",
    "/v1/bank/report/..%2F..%2Fpyproject.toml",
    "/v1/bank/report/classifier.onnx",
    "/v1/bank/report/.hidden.json",
    "/v1/bank/report/nope.png",
    "/v1/bank/report/%2Fetc%2Fpasswd",
])
def test_report_path_is_confined(report_server: ServerProcess, path: str) -> None:
    with report_server.client() as c:
        r = c.get(path)
    assert r.status_code == 404, (path, r.text[:200])


def test_report_rejects_links_and_folders(tmp_path: Path) -> None:
    from service.dataplane import ServiceError
    from service.report_route import report_file

    (tmp_path / "report" / "sub.png").mkdir(parents=True)
    (tmp_path / "secret.json").write_text("{}")
    (tmp_path / "report" / "link.json").symlink_to(tmp_path / "secret.json")
    (tmp_path / "report" / "ok.json").write_text("{}")
    assert report_file(tmp_path, "ok.json").name == "ok.json"
    for name in ("sub.png", "link.json", "secret.json", "ok.JSON.exe", "OK.json"):
        with pytest.raises(ServiceError) as exc:
            report_file(tmp_path, name)
        assert exc.value.status == 404


@pytest.mark.slow  # a headless browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_opens_in_headless_chromium_with_every_image(
        report_server: ServerProcess, tmp_path: Path) -> None:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=10000", "--dump-dom", f"{report_server.url}/v1/bank/report"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    dom = out.stdout
    assert "<h2>Verdict</h2>" in dom, out.stderr[-2000:]
    status = re.search(r'id="images-status"[^>]*', dom)
    assert status, dom[-2000:]
    loaded = int(re.search(r'data-loaded="(\d+)"', status.group(0)).group(1))
    total = int(re.search(r'data-total="(\d+)"', status.group(0)).group(1))
    assert total >= 40  # curves, heatmaps and the example thumbnails
    assert loaded == total, status.group(0)


def test_a_bank_without_a_report_answers_404(tmp_path: Path) -> None:
    """A bank folder without a report answers 404 on the report path (not a 500)."""
    from service.dataplane import ServiceError
    from service.report_route import report_file

    with pytest.raises(ServiceError):
        report_file(tmp_path, "index.html")
