"""The summary of the bank being served (``GET /v1/bank``): manifest fields, the runtime,
the headline detection figures of the bank's ``report/metrics.json``; and the rejection rate
its evaluation expects on clean inputs (a metrics baseline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.operating import threshold_view

if TYPE_CHECKING:
    from conceptguard.runtime import Runtime
    from service.runtime_state import Loaded


def bank_summary(loaded: Loaded, path: str) -> dict[str, Any]:
    m = loaded.bank.manifest
    vlm = {"id": m.vlm.get("id"), "zero_shot_accuracy": m.vlm.get("zero_shot_accuracy")}
    spec = m.vlm.get("spec")
    if isinstance(spec, dict):
        vlm.update({"backend": spec.get("backend"), "model": spec.get("model")})
    if "note" in m.vlm:
        vlm["note"] = m.vlm["note"]
    return {
        "id": m.bank_id, "name": m.name, "model_name": loaded.model_name,
        "created_at": m.created_at, "schema_version": m.schema_version, "path": str(path),
        "classes": m.classes, "concepts": m.concept_names, "vlm": vlm,
        "classifier": {"hash": m.classifier.hash, "arch": m.classifier.spec.get("arch"),
                       "feature_dim": m.classifier.feature_dim,
                       "test_accuracy": m.classifier.test_accuracy},
        "threshold": threshold_view(loaded),
        "evaluation": {**m.evaluation, **_report_headline(loaded.bank.path)},
        "runtime": {"backend": loaded.runtime.name, "device": loaded.runtime.device,
                    "provider": getattr(loaded.runtime, "provider", loaded.runtime.device),
                    "graph": runtime_graph(loaded.runtime)},
    }


def _report_headline(bank_path: Path) -> dict[str, Any]:
    """Detection figures from ``report/metrics.json`` when the bank has one."""
    try:
        report = json.loads((bank_path / "report" / "metrics.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(report, dict):
        return {}

    def aurocs(section: Any) -> dict[str, float]:
        if not isinstance(section, dict):
            return {}
        return {k: v["auroc"] for k, v in section.items()
                if isinstance(v, dict) and _finite_number(v.get("auroc"))}

    out: dict[str, Any] = {}
    if mis := aurocs(report.get("misclassification")):
        out["misclassification_auroc"] = mis
    adversarial = report.get("adversarial")
    if isinstance(adversarial, dict):
        adv = {name: aurocs(sec) for name, sec in adversarial.items() if aurocs(sec)}
        if adv:
            out["adversarial_auroc"] = adv
    mixed = report.get("mixed")
    if isinstance(mixed, dict):
        risks = {k: v["risk_at_90_coverage"] for k, v in mixed.items()
                 if isinstance(v, dict) and _finite_number(v.get("risk_at_90_coverage"))}
        if risks:
            out["mixed_risk_at_90_coverage"] = risks
    return out


def json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats (a manifest may hold NaN) become null."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def expected_rejection_rate(evaluation: dict[str, Any]) -> float | None:
    """The share of clean test inputs the bank's threshold rejects (1 - its coverage), from
    the manifest's evaluation; None when the bank does not state it."""
    threshold = evaluation.get("threshold")
    coverage = threshold.get("coverage") if isinstance(threshold, dict) else None
    if not _finite_number(coverage) or not 0.0 <= float(coverage) <= 1.0:
        return None
    return 1.0 - float(coverage)


def _finite_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and np.isfinite(value))


def runtime_graph(runtime: Runtime) -> str:
    """``fused`` when the scores come out of the runtime call (``monitor.onnx``, or the
    torch backend's fused module), ``classifier`` when numpy
    :func:`conceptguard.scoring.score` computes them."""
    return getattr(runtime, "graph", "classifier")
