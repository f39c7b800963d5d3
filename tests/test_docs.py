"""The docs are self-contained, and docs/service.md's examples are the shipped bank's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# ---------------------------------------------------------------- generated figures


def _docs_script():  # scripts/docs.py as a module (it is a script, not a package)
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_script", REPO / "scripts" / "docs.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_a_figure_that_drifts_from_metrics_json_is_caught() -> None:
    docs = _docs_script()
    acc = docs.metrics()["classifier"]["test_accuracy"]
    stale = "accuracy <!-- value: metrics:classifier.test_accuracy .1% -->12.3%<!-- /value -->."
    fresh = docs.render(stale)
    assert fresh == f"accuracy <!-- value: metrics:classifier.test_accuracy .1% -->{acc:.1%}" \
                    "<!-- /value -->."
    assert docs.stale_parts(stale, fresh) and not docs.stale_parts(fresh, fresh)
    table = "<!-- generated: results-reasons -->\n| old |\n<!-- /generated -->\n"
    assert "| old |" not in docs.render(table)
    assert "| reject reason | mixed stream |" in docs.render(table)


def test_a_marker_without_a_source_fails_loudly() -> None:
    docs = _docs_script()
    for text in ("<!-- value: metrics:no.such.key -->1<!-- /value -->",
                 "<!-- value: calc:no_such_value -->1<!-- /value -->",
                 "<!-- generated: no-such-block -->\n<!-- /generated -->",
                 "<!-- generated: bench:no-such-file -->\n<!-- /generated -->"):
        with pytest.raises(SystemExit):
            docs.render(text)


def test_every_benchmark_result_the_docs_cite_says_how_and_when_it_was_made() -> None:
    docs = _docs_script()
    cited = set()
    for path in docs.doc_files():
        text = path.read_text()
        cited |= {m.group("name").removeprefix("bench:") for m in docs.BLOCK.finditer(text)
                  if m.group("name").startswith("bench:")}
        cited |= {m.group("key").split(":")[0] for m in docs.VALUE.finditer(text)
                  if m.group("key").split(":")[0] not in ("metrics", "manifest", "calc")}
    assert cited, "no benchmark figure is generated"
    for name in cited:
        r = json.loads((REPO / "benchmarks" / "results" / f"{name}.json").read_text())
        assert r.get("command") and r.get("date"), name


@pytest.mark.slow
def test_generated_doc_parts_are_current() -> None:
    """README.md and docs/*.md hold what scripts/docs.py writes from metrics.json, the
    manifest, the benchmark result files and the shipped bank served in-process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "docs.py"), "--check"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_every_offline_config_key_is_in_the_readme_table() -> None:
    from pydantic import BaseModel

    from offline.config import JobConfig

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Offline job configuration"):]
    table = table[:table.index("\n### ")]
    missing = []
    for name, field in JobConfig.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel) and name != "concepts":
            for sub in kind.model_fields:
                if not re.search(rf"`{name}\.(\{{[^}}]*\b{sub}\b[^}}]*\}}|{sub}\b)", table):
                    missing.append(f"{name}.{sub}")
        elif f"`{name}`" not in table and f"`{name}`," not in table:
            missing.append(name)
    assert not missing, f"README's offline configuration table lacks {missing}"


def test_the_reason_rule_in_docs_is_the_code_s() -> None:
    """docs/trust.md's table of reasons states the rule ``scoring.reasons`` applies: the
    larger of the misclassification and anomaly heads carries the reject; a tie of the kind
    heads is adversarial-like."""
    import numpy as np

    from conceptguard.scoring import reasons

    def one(m: float, n: float, a: float, u: float) -> str:
        return reasons(*(np.array([v]) for v in (True, m, n, a, u)))[0]

    assert one(0.6, 0.4, 0.9, 0.9) == "misclassification-like"
    assert one(0.4, 0.6, 0.7, 0.7) == "adversarial-like"  # a tie of the kind heads
    assert one(0.4, 0.6, 0.6, 0.7) == "unfamiliar"
    trust_doc = (REPO / "docs" / "trust.md").read_text()
    assert "`p_misclassification` >= `p_anomaly`" in trust_doc
    assert "`p_anomaly` > `p_misclassification` and `p_adversarial` >= `p_unfamiliar`" in \
        trust_doc
    assert "`p_anomaly` > `p_misclassification` and `p_unfamiliar` > `p_adversarial`" in \
        trust_doc


def test_every_service_setting_is_in_both_settings_tables() -> None:
    from service.settings import Settings

    for doc in (REPO / "README.md", REPO / "docs" / "service.md"):
        text = doc.read_text()
        missing = [name for name in Settings.model_fields
                   if f"| `{name}` | `CONCEPTGUARD_{name.upper()}` |" not in text]
        assert not missing, f"{doc.name}'s settings table lacks {missing}"
    grpc_host = Settings.model_fields["grpc_host"].default
    assert f"| `grpc_host` | `CONCEPTGUARD_GRPC_HOST` | `{grpc_host}` |" in (
        REPO / "README.md").read_text()


def test_a_check_takes_a_last_digit_flip_and_nothing_more() -> None:
    """The docs checks accept a float32 value that printed one unit off in its last decimal
    on another CPU, and refuse every other difference: two units, an integer, a word, a
    number more or less, an exponent."""
    sys.path.insert(0, str(REPO / "scripts"))
    from printed_numbers import same_to_last_digit

    doc = '"trust": 0.9473, "n": 512, accuracy 91.2%, "p": 0.1'
    assert same_to_last_digit(doc, doc)
    assert same_to_last_digit(doc, doc.replace("0.9473", "0.9474"))
    assert same_to_last_digit(doc, doc.replace("91.2%", "91.1%"))
    assert same_to_last_digit(doc, doc.replace("0.1", "0.0999"))  # 0.10005 rounded either way
    for changed in (doc.replace("0.9473", "0.9475"), doc.replace("512", "513"),
                    doc.replace("trust", "trusts"), doc + " 1", doc.replace("0.1", "0.3")):
        assert not same_to_last_digit(doc, changed), changed
    assert not same_to_last_digit("x 1e-05", "x 2e-05")
    # the docs script skips such a flip in --check: the rendered doc equals itself
    docs = _docs_script()
    assert docs.same_to_last_digit is same_to_last_digit
