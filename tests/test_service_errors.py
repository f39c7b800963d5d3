"""Bad input answers a 4xx JSON error naming the problem, and the server keeps serving;
a full queue answers 503 with Retry-After."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import time
import zlib
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ServerProcess, encode_image, metric_sum


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` 8-bit grey pixels, with a tiny IDAT:
    a decompression bomb as far as the header goes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def expect_error(resp: httpx.Response, status: int, code: str | None = None,
                 mentions: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"code", "message"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if mentions is not None:
        assert mentions.lower() in err["message"].lower(), err
    return err


def upload(client: httpx.Client, data: bytes, name: str = "x.png") -> httpx.Response:
    return client.post("/v1/classify", files={"file": (name, data, "application/octet-stream")})


def test_empty_file(client: httpx.Client) -> None:
    expect_error(upload(client, b""), 400, "empty")


def test_not_an_image(client: httpx.Client) -> None:
    expect_error(upload(client, b"this is plain text, not a picture" * 10), 400,
                 "not_an_image")


def test_truncated_png(client: httpx.Client, sample_png: bytes) -> None:
    noisy = encode_image(Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8), "L"))
    expect_error(upload(client, noisy[: len(noisy) // 2]), 400, "corrupt")
    expect_error(upload(client, sample_png[:40]), 400)


def test_oversized_upload_is_refused_before_reading_it(client: httpx.Client) -> None:
    limit = 10 * 1024 * 1024
    big = b"\0" * (limit + 1024)
    expect_error(upload(client, big), 413, "too_large", mentions="limit")

    def chunks():  # no Content-Length: the limit applies to the stream
        for _ in range(12):
            yield b"\0" * (1024 * 1024)

    streamed = client.post("/v1/classify", content=chunks(),
                           headers={"content-type": "image/png"})
    expect_error(streamed, 413, "too_large")


def test_decompression_bomb(client: httpx.Client) -> None:
    # 7000 x 7000 = 49 M pixels > the 40 M default; the header alone decides
    expect_error(upload(client, png_header_only(7000, 7000)), 413, "too_many_pixels")
    # beyond PIL's own bomb limit (2 x 89 M) PIL refuses at open: the same 413, never decoded
    expect_error(upload(client, png_header_only(20000, 20000)), 413, "too_many_pixels")


def test_unsupported_modes(client: httpx.Client) -> None:
    sixteen_bit = Image.fromarray(np.full((28, 28), 40000, dtype=np.uint16))
    expect_error(upload(client, encode_image(sixteen_bit, "PNG")), 415, "unsupported_mode")
    float_tiff = Image.fromarray(np.random.default_rng(0).random((28, 28), dtype=np.float32))
    expect_error(upload(client, encode_image(float_tiff, "TIFF"), "x.tif"), 415,
                 "unsupported_mode")


def test_too_many_images(client: httpx.Client, sample_png: bytes) -> None:
    b64 = base64.b64encode(sample_png).decode()
    expect_error(client.post("/v1/classify", json={"images": [b64] * 65}), 413,
                 "too_many_images", mentions="64")
    files = [("files", (f"{i}.png", sample_png, "image/png")) for i in range(65)]
    expect_error(client.post("/v1/classify", files=files), 413, "too_many_images",
                 mentions="65 images in one request; the limit is 64")
    # past the form parser's own file limit: the same check, which says it stopped counting
    files = [("files", (f"{i}.png", sample_png, "image/png")) for i in range(70)]
    expect_error(client.post("/v1/classify", files=files), 413, "too_many_images",
                 mentions="at least 66 images in one request; the limit is 64")


def test_bad_base64(client: httpx.Client, sample_png: bytes) -> None:
    good = base64.b64encode(sample_png).decode()
    err = expect_error(client.post("/v1/classify", json={"images": [good, "@@not base64@@"]}),
                       400, "invalid_base64")
    assert "images[1]" in err["message"]


def test_a_bad_image_in_a_batch_is_named(client: httpx.Client, sample_png: bytes) -> None:
    b64 = [base64.b64encode(x).decode() for x in (sample_png, b"garbage bytes", sample_png)]
    err = expect_error(client.post("/v1/classify", json={"images": b64}), 400, "not_an_image")
    assert err["message"].startswith("image 1:")


def test_invalid_json_and_wrong_structure(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    expect_error(client.post("/v1/classify", content=b"{not json", headers=headers), 400,
                 "invalid_json")
    expect_error(client.post("/v1/classify", json={"images": "not-a-list"}), 422,
                 "invalid_request")
    expect_error(client.post("/v1/classify", json={"pictures": []}), 422, "invalid_request")
    expect_error(client.post("/v1/classify", json={"images": []}), 422, "invalid_request")
    expect_error(client.post("/v1/monitor", content=b"[1, 2", headers=headers), 400,
                 "invalid_json")


def test_wrong_content_type_and_missing_field(client: httpx.Client, sample_png: bytes) -> None:
    expect_error(client.post("/v1/classify", content=b"hello",
                             headers={"content-type": "text/plain"}), 415,
                 "unsupported_media_type")
    expect_error(client.post("/v1/classify", files={"picture": ("x.png", sample_png)}), 400,
                 "no_file")


def test_monitor_shapes_and_values(client: httpx.Client, demo_manifest: dict[str, Any]) -> None:
    d = demo_manifest["dims"]["features"]
    c = demo_manifest["dims"]["classes"]
    err = expect_error(client.post("/v1/monitor", json={"features": [[0.1] * (d - 1)]}), 422,
                       "invalid_tensor")
    assert f"[N, {d}]" in err["message"]
    err = expect_error(client.post("/v1/monitor", json={"features": [[0.1] * d] * 2,
                                                        "logits": [[0.0] * c]}), 422,
                       "invalid_tensor")
    assert f"[2, {c}]" in err["message"]
    expect_error(client.post("/v1/monitor", json={"features": [[0.1] * d, [0.1] * 3]}), 422,
                 "invalid_tensor")
    nan_body = '{"features": [[' + ", ".join(["NaN"] + ["0.1"] * (d - 1)) + "]]}"
    expect_error(client.post("/v1/monitor", content=nan_body.encode(),
                             headers={"content-type": "application/json"}), 422,
                 "invalid_tensor", mentions="NaN")
    expect_error(client.post("/v1/monitor", json={"features": [["a"] * d]}), 422)
    expect_error(client.post("/v1/monitor", json={"features": []}), 422, "invalid_request")


def test_unknown_route_is_json(client: httpx.Client) -> None:
    expect_error(client.get("/v1/nothing-here"), 404, "not_found")


def test_server_still_serves_after_bad_input(client: httpx.Client, sample_png: bytes) -> None:
    """Self-contained (passes alone and in any order): send one bad request of each kind,
    check each is counted by its code, then that a good request still succeeds."""
    noisy = encode_image(Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8), "L"))
    b64 = base64.b64encode(sample_png).decode()
    sixteen_bit = encode_image(Image.fromarray(np.full((28, 28), 40000, dtype=np.uint16)), "PNG")
    bad = {
        "empty": lambda: upload(client, b""),
        "not_an_image": lambda: upload(client, b"plain text, not a picture" * 10),
        "corrupt": lambda: upload(client, noisy[: len(noisy) // 2]),
        "too_large": lambda: upload(client, b"\0" * (10 * 1024 * 1024 + 1024)),
        "too_many_pixels": lambda: upload(client, png_header_only(7000, 7000)),
        "unsupported_mode": lambda: upload(client, sixteen_bit),
        "too_many_images": lambda: client.post("/v1/classify", json={"images": [b64] * 65}),
        "invalid_base64": lambda: client.post("/v1/classify", json={"images": ["@@"]}),
        "invalid_json": lambda: client.post("/v1/classify", content=b"{not json",
                                            headers={"content-type": "application/json"}),
        "invalid_tensor": lambda: client.post("/v1/monitor", json={"features": [[0.1] * 3]}),
    }

    def counts() -> dict[str, float]:
        text = client.get("/metrics").text
        return {code: metric_sum(text, "conceptguard_bad_requests_total", code=code)
                for code in bad}

    before = counts()
    for code, send in bad.items():
        r = send()
        assert 400 <= r.status_code < 500, (code, r.status_code)
        assert r.json()["error"]["code"] == code, r.text
    after = counts()
    for code in bad:
        assert after[code] - before[code] >= 1, code
    assert client.get("/v2/health/ready").status_code == 200
    assert upload(client, sample_png).status_code == 200


async def _burst(url: str, png: bytes, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as ac:
        return await asyncio.gather(*(
            ac.post("/v1/classify", files={"file": ("x.png", png, "image/png")})
            for _ in range(n)))


def test_queue_full_answers_503_with_retry_after(queue_full_server: ServerProcess,
                                                 sample_png: bytes) -> None:
    responses = asyncio.run(_burst(queue_full_server.url, sample_png, 50))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1
    busy = [r for r in responses if r.status_code == 503]
    assert busy, "no request was refused with queue_size=1"
    for r in busy:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    with queue_full_server.client() as c:
        assert c.get("/v2/health/ready").status_code == 200
        assert upload(c, sample_png).status_code == 200
        text = c.get("/metrics").text
    assert metric_sum(text, "conceptguard_queue_full_total") == len(busy)
    assert metric_sum(text, "conceptguard_requests_total", endpoint="/v1/classify",
                      status="503") == len(busy)
    assert metric_sum(text, "conceptguard_queue_depth") == 0


def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import SettingsError, load_settings

    monkeypatch.setenv("CONCEPTGUARD_MAX_BATCH_SIZE", "0")
    monkeypatch.setenv("CONCEPTGUARD_BACKEND", "tensorflow")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "CONCEPTGUARD_MAX_BATCH_SIZE" in message and "CONCEPTGUARD_BACKEND" in message
    monkeypatch.delenv("CONCEPTGUARD_MAX_BATCH_SIZE")
    monkeypatch.delenv("CONCEPTGUARD_BACKEND")
    monkeypatch.setenv("CONCEPTGUARD_ADMIN_TOKEN", "")
    s = load_settings()
    assert s.admin_token is None and s.max_batch_size == 32 and s.backend == "onnx"


def test_bad_setting_stops_startup_naming_it(tmp_path: Any) -> None:
    from tests.conftest import launch_server

    srv = launch_server(tmp_path, settings={"max_batch_size": "lots"})
    try:
        assert srv.process.wait(timeout=120) != 0
    finally:
        srv.stop()
    assert "CONCEPTGUARD_MAX_BATCH_SIZE" in srv.log_tail()


def _settled(client: httpx.Client, done: Any, timeout: float = 15.0) -> str:
    """The metrics text once ``done(text)`` holds (the server counts a request after its
    handler returns, a moment after the client went away)."""
    deadline = time.monotonic() + timeout
    while True:
        text = client.get("/metrics").text
        if done(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["raw", "multipart", "json"])
def test_a_client_gone_mid_body_is_499_not_a_server_error(
        server: ServerProcess, client: httpx.Client, kind: str) -> None:
    """A client that closes its connection before its body is complete: counted 499
    (``client_closed``), not 500, and no traceback in the log."""
    def count(text: str, status: str) -> float:
        return metric_sum(text, "conceptguard_requests_total", endpoint="/v1/classify",
                          status=status)

    before = client.get("/metrics").text
    ctype = {"raw": "image/png", "multipart": "multipart/form-data; boundary=xyz",
             "json": "application/json"}[kind]
    start = {"raw": b"\x89PNG\r\n\x1a\n", "json": b'{"images": ["',
             "multipart": b'--xyz\r\nContent-Disposition: form-data; name="file"; '
                          b'filename="a.png"\r\n\r\n'}[kind]
    url = httpx.URL(server.url)
    with socket.create_connection((url.host, url.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     + ctype.encode() + b"\r\nContent-Length: 100000\r\n\r\n" + start
                     + b"\0" * 5000)
        time.sleep(0.3)
    after = _settled(client, lambda t: count(t, "499") >= count(before, "499") + 1)
    assert count(after, "499") == count(before, "499") + 1
    assert count(after, "500") == count(before, "500")
    assert (metric_sum(after, "conceptguard_bad_requests_total", code="client_closed")
            == metric_sum(before, "conceptguard_bad_requests_total", code="client_closed") + 1)
    assert "ClientDisconnect" not in server.log_tail(20000)
