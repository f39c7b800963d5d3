"""The docs are self-contained, and docs/service.md's examples are the shipped bank's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "deploy" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_method_doc_exists_and_nothing_cites_an_outside_spec() -> None:
    assert (REPO / "docs" / "method.md").is_file()
    code = [*REPO.glob("conceptguard/**/*.py"), *REPO.glob("offline/*.py"),
            *REPO.glob("service/*.py")]
    for path in [*DOCS, *code]:
        text = path.read_text()
        assert "METHOD.md" not in text, path
        assert "../shared" not in text and "shared/" not in text.replace("shared/ ", ""), path


def test_relative_links_stay_inside_the_repository() -> None:
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target):  # http(s) etc.: none expected
                raise AssertionError(f"{doc.name} links outside the repository: {target}")
            resolved = (doc.parent / target).resolve()
            assert resolved.is_relative_to(REPO), (doc.name, target)
            assert resolved.exists(), (doc.name, target)


def test_service_examples_are_current() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "service_examples.py"),
                        "--check"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = (REPO / "docs" / "service.md").read_text()
    for field in ("label", "class_index", "probabilities", "trust", "reject", "reason",
                  "heads", "paper_rule_reject", "bank", "latency_ms"):
        assert f'"{field}"' in doc, field
    for kind in ("accepted", "unfamiliar"):
        assert f'"kind": "{kind}"' in doc, kind
