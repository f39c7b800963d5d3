"""Decode memory is bounded by design (issue 8, item 1): 16 concurrent maximum-size images
(6000 x 6000 RGBA PNGs of ~140 KB) raise a worker's peak RSS by no more than the documented
budget, and the memory goes back afterwards. A real server; RSS read from /proc."""

from __future__ import annotations

import concurrent.futures
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import launch_server, wait_ready

pytestmark = pytest.mark.slow  # measures the RSS of real servers under large uploads

SIDE = 6000
CONCURRENT = 16
DECODE_CONCURRENCY = 2
MAX_PIXELS = 40_000_000
MIB = 1 << 20
# the budget docs/reliability.md states: per concurrent decode 6 bytes per pixel of the
# largest image (RGBA 4 + the converted copy 1 + decoder buffers), plus 64 MiB slack
BUDGET = DECODE_CONCURRENCY * 6 * SIDE * SIDE + 64 * MIB


def _status(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def _big_png() -> bytes:
    img = np.zeros((SIDE, SIDE, 4), np.uint8)
    img[..., 3] = 255
    img[SIDE // 4: 3 * SIDE // 4, SIDE // 4: 3 * SIDE // 4, :3] = 200
    buf = io.BytesIO()
    Image.fromarray(img, "RGBA").save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_rss_stays_within_the_decode_budget(tmp_path: Path) -> None:
    png = _big_png()
    assert len(png) < 1 * MIB
    srv = launch_server(tmp_path / "logs", settings={
        "decode_concurrency": DECODE_CONCURRENCY, "max_image_pixels": MAX_PIXELS})
    try:
        wait_ready(srv)
        pid = srv.process.pid
        small = io.BytesIO()
        Image.new("RGBA", (64, 64)).save(small, format="PNG")
        with srv.client() as c:  # one ordinary request first: steady state
            assert c.post("/v1/classify", content=small.getvalue(),
                          headers={"Content-Type": "image/png"}).status_code == 200
        base = _status(pid)

        def call(_: int) -> int:
            return httpx.post(f"{srv.url}/v1/classify", content=png, timeout=300,
                              headers={"Content-Type": "image/png"}).status_code

        with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
            statuses = list(pool.map(call, range(CONCURRENT)))
        assert statuses == [200] * CONCURRENT, statuses
        after = _status(pid)
        peak_growth = after["VmHWM"] - base["VmRSS"]
        print(f"decode memory: base RSS {base['VmRSS'] / MIB:.0f} MiB, peak "
              f"{after['VmHWM'] / MIB:.0f} MiB (+{peak_growth / MIB:.0f} MiB, budget "
              f"{BUDGET / MIB:.0f} MiB), after {after['VmRSS'] / MIB:.0f} MiB")
        assert peak_growth <= BUDGET
        assert after["VmRSS"] - base["VmRSS"] <= 64 * MIB  # given back
    finally:
        srv.stop()
