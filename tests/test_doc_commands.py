"""Every shell block in README.md and docs/ either runs, here, against a real server on the
demo bank, or is marked as not run with the reason (``<!-- not-run: why -->`` on the line
before its fence)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEMO_BANK, REPO, ServerProcess

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"sh", "bash", "shell", "console"}
FENCE = re.compile(r"^```(?P<lang>[A-Za-z]*)\n(?P<code>.*?)^```$", re.M | re.S)
NOT_RUN = re.compile(r"<!-- not-run: (?P<why>[^>]*\S)\s*-->\s*$")
TOKEN = "doc-commands-token"


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    code: str
    not_run: str | None  # the reason, when marked

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def shell_blocks(doc: Path) -> list[Block]:
    text = doc.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group("lang") not in SHELL:
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        out.append(Block(doc, text[:m.start()].count("\n") + 1, m.group("code"),
                         marker.group("why") if marker else None))
    return out


BLOCKS = [b for doc in DOCS for b in shell_blocks(doc)]
RUN = [b for b in BLOCKS if b.not_run is None]


def test_the_parser_sees_the_blocks_and_their_markers(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n```sh\necho a\n```\n\n<!-- not-run: needs Docker -->\n```sh\n"
                   "docker run x\n```\n\n```python\nprint(1)\n```\n")
    blocks = shell_blocks(doc)
    assert [(b.code, b.not_run) for b in blocks] == [("echo a\n", None),
                                                       ("docker run x\n", "needs Docker")]


def test_every_marker_precedes_a_shell_block_and_gives_a_reason() -> None:
    for doc in DOCS:
        text = doc.read_text()
        markers = len(re.findall(r"<!-- not-run:", text))
        marked = sum(b.not_run is not None for b in shell_blocks(doc))
        assert markers == marked, f"{doc.name}: a not-run marker is not right before a shell block"
    assert RUN, "no shell block is run"
    assert len(RUN) < len(BLOCKS), "no block is marked: is the marker syntax still parsed?"


def _script(block: Block, server: ServerProcess, tmp: Path) -> str:
    """The block as a user would paste it, pointed at the test's server and scratch folder;
    curl fails on an HTTP error, so a 4xx/5xx fails the block."""
    code = re.sub(r"(localhost|127\.0\.0\.1):8000", f"127.0.0.1:{server.port}", block.code)
    code = re.sub(r"(localhost|127\.0\.0\.1):8001", f"127.0.0.1:{server.grpc_port}", code)
    code = code.replace("/tmp/", f"{tmp}/")
    return ("curl() { command curl --fail-with-body --max-time 60 \"$@\"; }\n"
            f"export TOKEN={TOKEN} CONCEPTGUARD_ADMIN_TOKEN={TOKEN}\n" + code)


@pytest.fixture(scope="module")
def doc_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    from tests.conftest import launch_server, wait_ready

    root = tmp_path_factory.mktemp("doc-commands")
    shutil.copytree(DEMO_BANK, root / "banks" / "demo")
    server = launch_server(root / "logs", bank=root / "banks" / "demo",
                           settings={"admin_token": TOKEN})
    try:
        yield wait_ready(server)
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("block", RUN, ids=[b.where for b in RUN])
def test_shell_block_runs(block: Block, doc_server: ServerProcess, tmp_path: Path) -> None:
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", _script(block, doc_server, tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (f"{block.where} failed ({r.returncode}):\n{block.code}\n"
                               f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}")
    assert r.stdout.strip(), f"{block.where} printed nothing"
