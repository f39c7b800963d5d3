#!/usr/bin/env python3
"""Writes deploy/grafana/dashboards/conceptguard.json, the ConceptGuard Grafana dashboard.

The JSON is generated so that panel ids, grid positions and the label filters stay
consistent; edit this file, then run

    python deploy/grafana/build_dashboard.py          # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is stale

Only the metric names the service exports (see deploy/README.md) are used; a test checks it.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "conceptguard.json"

DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
F = 'job=~"$job"'  # metrics without a model label
FM = 'job=~"$job", model=~"$model"'  # metrics with one
NOT_PROBES = 'endpoint!~".*(health|metrics).*"'


def target(expr: str, legend: str = "", ref: str = "A", **kw: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "refId": ref, "expr": expr,
                         "legendFormat": legend or "__auto", "range": True, "instant": False}
    t.update(kw)
    return t


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(e, lg, chr(ord("A") + i)) for i, (e, lg) in enumerate(pairs)]


class Layout:
    """Places panels left to right on Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1
        self.panels: list[dict[str, Any]] = []

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_h
        self.panels.append({"id": self._id(), "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.x, self.y, self.row_h = 0, self.y + 1, 0

    def stack(self, panels: list[tuple[dict[str, Any], int]], w: int) -> None:
        """A column of panels (panel, height) stacked at the current position."""
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        y = self.y
        for panel, h in panels:
            self.panels.append({"id": self._id(), **panel,
                                "gridPos": {"h": h, "w": w, "x": self.x, "y": y}})
            y += h
        self.x += w
        self.row_h = max(self.row_h, y - self.y)

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel = {"id": self._id(), **panel, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def timeseries(title: str, desc: str, tgts: list[dict[str, Any]], unit: str = "short",
               min_: float | None = None, max_: float | None = None,
               stack: bool = False) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if not stack else 40,
                   "showPoints": "never", "spanNulls": False,
                   "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
    }
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {"type": "timeseries", "title": title, "description": desc, "datasource": DS,
            "targets": tgts, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "right",
                                   "showLegend": True, "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, desc: str, expr: str, unit: str, steps: list[tuple[str, float | None]]
         ) -> dict[str, Any]:
    return {"type": "stat", "title": title, "description": desc, "datasource": DS,
            "targets": [target(expr, title)],
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {
                "mode": "absolute",
                "steps": [{"color": c, "value": v} for c, v in steps]}}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "area", "textMode": "auto",
                        "justifyMode": "auto", "orientation": "auto"}}


def heatmap(title: str, desc: str, bucket_metric: str, matchers: str, unit: str
            ) -> dict[str, Any]:
    expr = f"sum by (le) (increase({bucket_metric}{{{matchers}}}[{RI}]))"
    return {"type": "heatmap", "title": title, "description": desc, "datasource": DS,
            "targets": [target(expr, "{{le}}", format="heatmap")],
            "fieldConfig": {"defaults": {"custom": {"hideFrom": {"legend": False,
                                                                 "tooltip": False,
                                                                 "viz": False},
                                                    "scaleDistribution": {"type": "linear"}}},
                            "overrides": []},
            "options": {"calculate": False, "cellGap": 1,
                        "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64,
                                  "exponent": 0.5, "scale": "exponential", "fill": "dark-orange",
                                  "reverse": False},
                        "rowsFrame": {"layout": "auto"},
                        "yAxis": {"axisPlacement": "left", "unit": unit, "reverse": False},
                        "filterValues": {"le": 1e-9},
                        "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
                        "legend": {"show": True},
                        "exemplars": {"color": "rgba(255,0,255,0.7)"}}}


def quantiles(metric: str, matchers: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)
              ) -> list[dict[str, Any]]:
    by_le = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return targets(*[(f"histogram_quantile({q}, sum by ({by_le}) "
                      f"(rate({metric}_bucket{{{matchers}}}[{RI}])))",
                      f"{prefix}p{round(q * 100)}") for q in qs])


def ratio(num: str, den: str) -> str:
    return f"{num}\n/\n{den}"


def build() -> dict[str, Any]:
    L = Layout()
    preds = "conceptguard_predictions_total"

    # ---- decisions ---------------------------------------------------------------------
    L.row("Decisions")
    L.add(timeseries(
        "Rejection rate: overall and by reason",
        "Fraction of predictions the monitor rejected (headline), and the fraction rejected as "
        "misclassification-like or adversarial-like, plus the paper's fixed rule, beside the "
        "share of clean test inputs the bank's threshold rejects. A jump means the inputs "
        "changed.",
        targets(
            (ratio(f'sum(rate({preds}{{{FM}, decision="reject"}}[{RI}]))',
                   f"sum(rate({preds}{{{FM}}}[{RI}]))"), "overall"),
            (ratio(f"sum by (reason) (rate(conceptguard_rejections_total{{{FM}}}[{RI}]))",
                   f"on () group_left sum(rate({preds}{{{FM}}}[{RI}]))"), "{{reason}}"),
            (ratio(f"sum(rate(conceptguard_paper_rule_rejections_total{{{FM}}}[{RI}]))",
                   f"sum(rate({preds}{{{FM}}}[{RI}]))"), "paper rule"),
            (f"max(conceptguard_expected_rejection_rate{{{FM}}})", "bank's rate on clean data"),
        ), unit="percentunit", min_=0), w=18, h=9)
    L.stack([
        (stat("Rejection rate (5m)", "Rejected / all predictions over the last 5 minutes.",
              ratio(f'sum(rate({preds}{{{FM}, decision="reject"}}[5m]))',
                    f"sum(rate({preds}{{{FM}}}[5m]))"),
              "percentunit", [("green", None), ("orange", 0.1), ("red", 0.25)]), 5),
        (stat("Targets up", "Scraped conceptguard targets that answer / all of them.",
              f'sum(up{{{F}, job=~"conceptguard.*"}})'
              f' / count(up{{{F}, job=~"conceptguard.*"}})', "percentunit",
              [("red", None), ("orange", 0.99), ("green", 1)]), 4),
    ], w=6)
    L.add(timeseries(
        "Rejection rate per class",
        "Fraction of the predictions of each (predicted) class that were rejected.",
        targets((ratio(f'sum by (class) (rate({preds}{{{FM}, decision="reject"}}[{RI}]))',
                       f"sum by (class) (rate({preds}{{{FM}}}[{RI}]))"), "{{class}}")),
        unit="percentunit", min_=0), w=12, h=9)
    L.add(timeseries(
        "Predictions per second by decision", "Accepted and rejected predictions per second.",
        targets((f"sum by (decision) (rate({preds}{{{FM}}}[{RI}]))", "{{decision}}")),
        unit="ops", min_=0, stack=True), w=12, h=9)
    L.add(timeseries(
        "Predicted-class mix",
        "Share of the predictions that went to each class. A class taking over (or "
        "vanishing) is prior shift, or a classifier that collapsed onto one answer.",
        targets((ratio(f"sum by (class) (rate({preds}{{{FM}}}[{RI}]))",
                       f"on () group_left sum(rate({preds}{{{FM}}}[{RI}]))"), "{{class}}")),
        unit="percentunit", min_=0, max_=1, stack=True), w=24, h=8)

    # ---- accuracy ----------------------------------------------------------------------
    L.row("Estimated and realised accuracy")
    trust_sum = "conceptguard_trust_sum_total"
    L.add(timeseries(
        "Estimated vs. realised accuracy",
        "Estimated: the mean trust score (P(prediction is right)) over the interval, of all "
        "inputs and of the accepted ones; the per-worker moving average the service keeps. "
        "Realised: the share of the labels sent back through POST /v1/feedback that match "
        "the prediction, over the last hour (labels arrive late and sparse).",
        targets(
            (ratio(f"sum(rate({trust_sum}{{{FM}}}[{RI}]))", f"sum(rate({preds}{{{FM}}}[{RI}]))"),
             "estimated, all"),
            (ratio(f'sum(rate({trust_sum}{{{FM}, decision="accept"}}[{RI}]))',
                   f'sum(rate({preds}{{{FM}, decision="accept"}}[{RI}]))'), "estimated, accepted"),
            (f"avg by (inputs) (conceptguard_estimated_accuracy{{{FM}}})",
             "moving average, {{inputs}}"),
            (ratio(f"sum by (decision) (rate(conceptguard_feedback_correct_total{{{FM}}}[1h]))",
                   f"sum by (decision) (rate(conceptguard_feedback_total{{{FM}}}[1h]))"),
             "realised, {{decision}}"),
        ), unit="percentunit", min_=0, max_=1), w=12, h=9)
    L.add(timeseries(
        "Estimated accuracy per predicted class",
        "Mean trust score of the inputs predicted as each class.",
        targets((ratio(f"sum by (class) (rate({trust_sum}{{{FM}}}[{RI}]))",
                       f"sum by (class) (rate({preds}{{{FM}}}[{RI}]))"), "{{class}}")),
        unit="percentunit", min_=0, max_=1), w=12, h=9)
    L.add(timeseries(
        "Realised accuracy by decision and reason",
        "Of the labels sent back in the last hour, the share that match the prediction: high "
        "for accepted inputs, low for rejected ones when the rejections are right.",
        targets((ratio(f"sum by (decision, reason) (rate(conceptguard_feedback_correct_total"
                       f"{{{FM}}}[1h]))",
                       "sum by (decision, reason) (rate(conceptguard_feedback_total"
                       f"{{{FM}}}[1h]))"),
                 "{{decision}} {{reason}}")),
        unit="percentunit", min_=0, max_=1), w=12, h=8)
    L.add(timeseries(
        "Labels received per second", "Labels sent back through POST /v1/feedback.",
        targets((f"sum by (decision) (rate(conceptguard_feedback_total{{{FM}}}[{RI}]))",
                 "{{decision}}")), unit="ops", min_=0, stack=True), w=12, h=8)

    # ---- scores ------------------------------------------------------------------------
    L.row("Trust and head scores")
    L.add(heatmap("Trust score distribution",
                  "Histogram of trust scores per interval (low = untrusted).",
                  "conceptguard_trust_score_bucket", FM, "short"), w=12, h=9)
    L.add(timeseries("Trust score median and p10",
                     "Median and 10th percentile of the trust score (from histogram buckets).",
                     quantiles("conceptguard_trust_score", FM, qs=(0.5, 0.1)), min_=0),
          w=12, h=9)
    L.add(timeseries("Head score quantiles",
                     "p50 / p90 / p99 of the misclassification and adversarial head scores.",
                     quantiles("conceptguard_head_score", FM, by="head", qs=(0.5, 0.9, 0.99))),
          w=24, h=8)

    # ---- traffic and latency -------------------------------------------------------------
    L.row("Traffic and latency")
    L.add(timeseries("Request rate by status", "HTTP requests per second by status.",
                     targets((f"sum by (status) (rate(conceptguard_requests_total{{{F}}}[{RI}]))",
                              "{{status}}")), unit="reqps", min_=0, stack=True), w=12, h=8)
    L.add(timeseries("Request rate by endpoint", "HTTP requests per second by endpoint.",
                     targets((f"sum by (endpoint) (rate(conceptguard_requests_total{{{F}}}[{RI}]))",
                              "{{endpoint}}")), unit="reqps", min_=0), w=12, h=8)
    L.add(timeseries("Request latency p50 / p95 / p99",
                     "End-to-end request duration (health and metrics endpoints excluded).",
                     quantiles("conceptguard_request_duration_seconds", f"{F}, {NOT_PROBES}"),
                     unit="s", min_=0), w=8, h=8)
    L.add(timeseries("Latency p50 / p99 per endpoint",
                     "Request duration per endpoint (health and metrics endpoints excluded).",
                     targets(*[(f"histogram_quantile({q}, sum by (endpoint, le) (rate("
                                f"conceptguard_request_duration_seconds_bucket{{{F}, {NOT_PROBES}}}"
                                f"[{RI}])))", f"{{{{endpoint}}}} p{round(q * 100)}")
                               for q in (0.5, 0.99)]), unit="s", min_=0), w=24, h=8)
    L.add(timeseries("Queue wait p50 / p95 / p99",
                     "Time a request waits in the batching queue before its batch runs.",
                     quantiles("conceptguard_queue_wait_seconds", F), unit="s", min_=0),
          w=8, h=8)
    L.add(timeseries("Inference p50 / p95 / p99",
                     "Duration of one batched model run.",
                     quantiles("conceptguard_inference_duration_seconds", F), unit="s", min_=0),
          w=8, h=8)

    # ---- batching and queue ------------------------------------------------------------
    L.row("Batching and queue")
    L.add(heatmap("Batch size distribution", "Histogram of the sizes of the batches run.",
                  "conceptguard_batch_size_bucket", F, "short"), w=12, h=8)
    L.add(timeseries("Mean batch size", "Images per batch, averaged over the interval.",
                     targets((ratio(f"sum(rate(conceptguard_batch_size_sum{{{F}}}[{RI}]))",
                                    f"sum(rate(conceptguard_batch_size_count{{{F}}}[{RI}]))"),
                              "mean batch size")), min_=0), w=6, h=8)
    L.add(timeseries("Queue depth", "Requests waiting in the batching queue, per instance.",
                     targets((f"sum by (instance) (conceptguard_queue_depth{{{F}}})",
                              "{{instance}}")), min_=0), w=6, h=8)
    L.add(timeseries("Queue saturation",
                     "Images waiting / most the queue admits (CONCEPTGUARD_QUEUE_SIZE, summed "
                     "over the workers), per instance. At 100% requests are refused with 503.",
                     targets((ratio(f"sum by (instance) (conceptguard_queue_depth{{{F}}})",
                                    f"sum by (instance) (conceptguard_queue_capacity{{{F}}})"),
                              "{{instance}}")), unit="percentunit", min_=0, max_=1), w=24, h=8)

    # ---- concept drift -----------------------------------------------------------------
    L.row("Concept drift")
    def concept_mean(window: str) -> str:
        # the scores are signed: the mean comes from the sums of the positive parts and of
        # the negative parts, which only grow (rate() of a signed sum reads resets)
        parts = "conceptguard_concept_score_parts_total"
        return ratio(
            f'(\nsum by (concept) (rate({parts}{{{FM}, sign="positive"}}[{window}]))\n-\n'
            f'sum by (concept) (rate({parts}{{{FM}, sign="negative"}}[{window}]))\n)',
            f"sum by (concept) (rate(conceptguard_concept_score_count{{{FM}}}[{window}]))")

    L.add(timeseries("Concept score running mean, per concept",
                     "Mean standardised concept score of the served images per interval "
                     "((positive parts - negative parts) / count). The scores are "
                     "standardised on the bank's clean reference split: 0 is the clean mean, "
                     "1 its standard deviation. A concept moving away from 0 is concept drift.",
                     targets((concept_mean(RI), "{{concept}}"))), w=24, h=10)
    L.add(timeseries("Concept drift: running mean minus 24h mean",
                     "Each concept's running mean minus its mean over the last 24 hours.",
                     targets((f"(\n{concept_mean(RI)}\n)\n-\n(\n{concept_mean('1d')}\n)",
                              "{{concept}}"))),
          w=12, h=9)
    L.add(timeseries("Concept score EMA (service gauge)",
                     "Exponential moving average each worker keeps, averaged over workers.",
                     targets((f"avg by (concept) (conceptguard_concept_score_mean{{{FM}}})",
                              "{{concept}}"))), w=12, h=9)

    # ---- errors and bank ---------------------------------------------------------------
    L.row("Errors and bank")
    L.add(timeseries("Bad requests by code", "Rejected requests (4xx) by error code.",
                     targets((f"sum by (code) (rate(conceptguard_bad_requests_total{{{F}}}[{RI}]))",
                              "{{code}}")), unit="reqps", min_=0), w=8, h=8)
    L.add(timeseries("Queue-full refusals", "Requests refused because the queue was full.",
                     targets((f"sum by (instance) (increase(conceptguard_queue_full_total"
                              f"{{{F}}}[{RI}]))", "{{instance}}")), min_=0), w=8, h=8)
    L.add(timeseries("Bank reloads by result", "Bank reloads through the admin API.",
                     targets((f"sum by (result) (increase(conceptguard_bank_reloads_total"
                              f"{{{F}}}[{RI}]))", "{{result}}")), min_=0), w=8, h=8)
    L.add(timeseries("Inference-logger sink events",
                     "CloudEvents taken at POST /v1/events (KServe's logger) by type and "
                     "result: accepted, invalid (4xx), busy (503), and request events "
                     "monitored or failed once scored.",
                     targets((f"sum by (type, result) (rate(conceptguard_sink_events_total"
                              f"{{{F}}}[{RI}]))", "{{type}} {{result}}")), unit="ops", min_=0),
          w=12, h=8)
    L.add(timeseries("Inference-logger sink pairs",
                     "Inputs whose served prediction (the response event) agrees or disagrees "
                     "with the bank classifier's, and events unreadable, expired or evicted "
                     "before their other half came.",
                     targets((f"sum by (result) (rate(conceptguard_sink_pairs_total{{{F}}}"
                              f"[{RI}]))", "{{result}}")), unit="ops", min_=0), w=12, h=8)
    # == 1: a reload sets the previous bank's series to 0
    info = ("max by (job, instance, model, bank_id, vlm, classifier_hash, schema_version) "
            f"(conceptguard_bank_info{{{FM}}} == 1)")
    L.add({"type": "table", "title": "Bank info",
           "description": "The bank each instance serves (conceptguard_bank_info).",
           "datasource": DS,
           "targets": [target(info, "", format="table", range=False, instant=True)],
           "fieldConfig": {"defaults": {}, "overrides": []},
           "options": {"showHeader": True, "cellHeight": "sm",
                       "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
           "transformations": [{"id": "organize", "options": {
               "excludeByName": {"Time": True, "Value": True},
               "indexByName": {"job": 0, "instance": 1, "model": 2, "bank_id": 3, "vlm": 4,
                               "classifier_hash": 5, "schema_version": 6},
               "renameByName": {}}}]}, w=16, h=7)
    L.add(timeseries("Reject threshold in use",
                     "The reject threshold each instance serves, on the calibrated trust scale "
                     "(reject when trust < it), by target: bank (the bank's own) or the "
                     "operating point chosen at serve time (CONCEPTGUARD_OPERATING_POINT, "
                     "PUT /v1/admin/operating-point), e.g. coverage:0.9. A target no longer "
                     "in use reads NaN in multiprocess mode and is left out.",
                     targets((f"max by (target) (conceptguard_reject_threshold{{{FM}}} >= 0)",
                              "{{target}}")), min_=0, max_=1), w=8, h=7)

    def query_var(name: str, label: str, query: str) -> dict[str, Any]:
        return {"name": name, "label": label, "type": "query", "datasource": DS,
                "definition": query, "query": {"query": query, "refId": f"{name}-values"},
                "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "sort": 1, "hide": 0, "regex": "", "options": []}

    return {
        "uid": "conceptguard-overview",
        "title": "ConceptGuard",
        "description": "Rejections, trust and head scores, latency, batching, concept drift and "
                       "bank of the conceptguard service.",
        "tags": ["conceptguard", "ml-monitoring"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "links": [],
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "annotations": {"list": [
            {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
             "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
             "name": "Annotations & Alerts", "type": "dashboard"},
            {"datasource": DS, "enable": True, "hide": False, "iconColor": "red",
             "name": "ConceptGuard alerts",
             "expr": 'ALERTS{alertstate="firing", alertname=~"ConceptGuard.*"}',
             "titleFormat": "{{alertname}}", "textFormat": "{{model}} {{instance}}",
             "step": "60s", "useValueForTime": False},
        ]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "refresh": 1, "hide": 0, "regex": "",
             "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
             "options": []},
            query_var("job", "Job", "label_values(conceptguard_bank_info, job)"),
            query_var("model", "Model", 'label_values(conceptguard_bank_info{job=~"$job"}, model)'),
        ]},
        "panels": L.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the JSON file is stale")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
