"""The example responses in docs/service.md, generated from the shipped demo bank.

Runs the service in-process (the real app, its lifespan and routes, through Starlette's test
client; no network) on ``banks/demo`` with the example images in ``examples/``, and prints
each example as a fenced JSON block. Floats are rounded to 4 digits, lists of more than 12
items and nested objects of more than 9 keys shortened to their first 3 (then ``"..."``),
``latency_ms`` shown as ``"..."`` and feedback receipts as ``"cg1.<payload>.<signature>"``
(they vary); every request sends a fixed ``x-request-id``; nothing else is edited.

    python scripts/service_examples.py           # print every example
    python scripts/service_examples.py --write   # rewrite the generated blocks of docs/service.md
    python scripts/service_examples.py --check   # exit 1 if docs/service.md differs

In docs/service.md a generated block sits between ``<!-- example: NAME -->`` and
``<!-- /example -->``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from printed_numbers import same_to_last_digit

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "service.md"
BANK = "banks/demo"
MARK = re.compile(r"(<!-- example: (?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /example -->)",
                  re.S)


RECEIPT = "cg1.<payload>.<signature>"


def _tidy(x: Any, key: str = "", depth: int = 0) -> Any:
    if key == "latency_ms":
        return "..."
    if key == "receipt":
        return RECEIPT
    if key == "receipts":
        return ",".join([RECEIPT] * len(x.split(",")))
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        cut = depth >= 2 and len(x) > 9
        keys = list(x)
        out = {k: _tidy(x[k], k, depth + 1) for k in (keys[:3] if cut else keys)}
        return {**out, "...": "..."} if cut else out
    if isinstance(x, list):
        items = [_tidy(v, "", depth + 1) for v in x]
        return [*items[:3], "..."] if len(items) > 12 else items
    return x


def _dump(x: Any, indent: int = 0, width: int = 96) -> str:
    """JSON, each value on one line where it fits in ``width``."""
    flat = json.dumps(x, ensure_ascii=False)
    if len(flat) + indent <= width or not isinstance(x, dict | list) or not x:
        return flat
    pad = " " * (indent + 2)
    if isinstance(x, dict):
        items = [f"{pad}{json.dumps(k)}: {_dump(v, indent + 2, width)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + _dump(v, indent + 2, width) for v in x]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def _block(obj: Any) -> str:
    return "```json\n" + _dump(_tidy(obj)) + "\n```\n"


def _png(name: str) -> bytes:
    return (REPO / "examples" / name).read_bytes()


def block(obj: Any) -> str:
    """One answer as the docs show it: a fenced JSON block, tidied as described above."""
    return _block(obj)


def examples() -> dict[str, str]:
    """Every example, name -> fenced JSON block."""
    return {name: _block(obj) for name, obj in answers().items()}


def answers() -> dict[str, Any]:
    """Every example, name -> the service's answer (parsed JSON, untidied)."""
    os.chdir(REPO)
    for k in [k for k in os.environ if k.startswith("CONCEPTGUARD_")]:
        del os.environ[k]
    os.environ["CONCEPTGUARD_BANK"] = BANK
    os.environ["CONCEPTGUARD_GRPC_PORT"] = "0"  # HTTP only: nothing binds a fixed port
    sys.path.insert(0, str(REPO))
    from fastapi.testclient import TestClient

    from conceptguard.bank import load_bank
    from conceptguard.imaging import preprocess_bytes, to_model_input
    from conceptguard.runtime import OnnxRuntime
    from service.app import create_app

    out: dict[str, Any] = {}
    with TestClient(create_app(), headers={"x-request-id": "example-1"}) as c:
        deadline = time.monotonic() + 120  # the bank loads and warms after startup
        while c.get("/v2/health/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("the service did not become ready within 120 s")
            time.sleep(0.05)

        def get(path: str) -> Any:
            r = c.get(path)
            r.raise_for_status()
            return r.json()

        def post(path: str, **kw: Any) -> Any:
            r = c.post(path, **kw)
            r.raise_for_status()
            return r.json()

        out["classify"] = (post("/v1/classify", files={"file": (
            "coat.png", _png("coat.png"), "image/png")}))
        out["classify_rejected"] = (post("/v1/classify", files={"file": (
            "noise.png", _png("noise.png"), "image/png")}))

        bank = load_bank(BANK)
        pre = bank.manifest.preprocessing
        img = preprocess_bytes(_png("bag.png"), input_size=pre.input_size,
                               channels=pre.channels, max_bytes=1 << 24, max_pixels=1 << 24)
        x = to_model_input(img[None])
        o = OnnxRuntime(bank.onnx_path, device="cpu").run(x)
        out["monitor"] = (post("/v1/monitor", json={
            "features": o.features.tolist(), "logits": o.logits.tolist()}))

        out["bank"] = (get("/v1/bank"))
        name = bank.manifest.name
        out["v2_model"] = (get(f"/v2/models/{name}"))
        out["v2_infer"] = (post(f"/v2/models/{name}/infer", json={
            "id": "42",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(_png("bag.png")).decode()]}],
            "outputs": [{"name": "label"}, {"name": "trust"}, {"name": "reject"},
                        {"name": "reason_kind"}, {"name": "reason_concepts"}]}))
    return out


def render(doc: str, blocks: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in blocks:
            raise SystemExit(f"docs/service.md names an unknown example {name!r}")
        return m.group(1) + blocks[name] + m.group(4)

    return MARK.sub(sub, doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true")
    g.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    blocks = examples()
    if not (args.write or args.check):
        for name, block in blocks.items():
            print(f"<!-- example: {name} -->\n{block}<!-- /example -->\n")
        return 0
    doc = DOC.read_text()
    missing = set(blocks) - {m.group("name") for m in MARK.finditer(doc)}
    new = render(doc, blocks)
    if args.write:
        DOC.write_text(new)
        return 0
    if missing or not same_to_last_digit(doc, new):  # float32 values: printed_numbers
        print(f"docs/service.md is out of date (missing: {sorted(missing)}); run "
              "python scripts/service_examples.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
