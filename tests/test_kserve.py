"""The KServe InferenceService (deploy/kserve/inferenceservice.yaml) against the schema of
``serving.kserve.io/v1beta1`` InferenceService.

What the schema is: KServe's CRD YAML is not on PyPI; ``deploy/kserve/inferenceservice.
schema.json`` is built by ``deploy/kserve/build_schema.py`` from the kserve 0.21 Python
client's generated models (the field names, types and required fields of every KServe object,
generated from KServe's OpenAPI spec), strict on unknown fields; the Kubernetes types inside
(Container, Probe, Volume, ObjectMeta, ...) are checked against the Kubernetes schemas that
kubernetes-validate ships."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.schema_checks import errors, k8s_validator, with_value

ROOT = Path(__file__).resolve().parents[1]
ISVC = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
SCHEMA = ROOT / "deploy" / "kserve" / "inferenceservice.schema.json"


@pytest.fixture(scope="module")
def validator() -> Any:
    return k8s_validator(SCHEMA)


@pytest.fixture(scope="module")
def isvc() -> dict[str, Any]:
    return yaml.safe_load(ISVC.read_text())



def test_inferenceservice_validates(validator: Any, isvc: dict[str, Any]) -> None:
    assert errors(validator, isvc) == []


@pytest.mark.parametrize(("path", "value", "mentions"), [
    (("spec", "predictorr"), {}, "predictorr"),  # unknown KServe field
    (("spec", "predictor", "minReplicas"), "two", "integer"),  # KServe field type
    (("spec", "predictor", "containers", 0, "readinessProbe", "httpGet", "pathh"), "/",
     "pathh"),  # unknown field in a Kubernetes type
    (("spec", "predictor", "containers", 0, "ports", 0, "containerPort"), "8000",
     "integer"),
    (("apiVersion",), "serving.kserve.io/v1alpha1", "v1beta1"),
])
def test_schema_rejects_broken_services(validator: Any, isvc: dict[str, Any],
                                        path: tuple[Any, ...], value: Any,
                                        mentions: str) -> None:
    doc = with_value(isvc, path, value)
    found = errors(validator, doc)
    assert found and any(mentions in e for e in found), found
    del doc["spec"]
    assert any("spec" in e for e in errors(validator, doc))


def test_logger_sink_example_validates_and_points_at_the_sink(validator: Any) -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "kserve" / "logger-sink.yaml").read_text())
    assert errors(validator, doc) == []
    logger = doc["spec"]["predictor"]["logger"]
    assert logger["mode"] == "all"
    assert logger["url"].endswith(":8000/v1/events")  # the sink route of service/routes_sink.py
    from service.app import create_app
    from service.metrics_export import _route_paths

    assert "/v1/events" in _route_paths(create_app().routes)


def test_schema_requires_a_predictor(validator: Any, isvc: dict[str, Any]) -> None:
    doc = copy.deepcopy(isvc)
    del doc["spec"]["predictor"]
    assert any("predictor" in e for e in errors(validator, doc))


def test_inferenceservice_serves_v2_rest_and_grpc_with_a_bank_from_storage(
        isvc: dict[str, Any]) -> None:
    from service.settings import Settings

    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == \
        "RawDeployment"  # both ports; Knative allows one per container
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert ports == {"http1": int(env["CONCEPTGUARD_HTTP_PORT"]),
                     "h2c": int(env["CONCEPTGUARD_GRPC_PORT"])}
    assert ports["h2c"] == Settings.model_fields["grpc_port"].default
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready",
                                                      "port": ports["http1"]}
    assert env["STORAGE_URI"].startswith("pvc://") and env["CONCEPTGUARD_BANK"] == "/mnt/models"
    pvc = yaml.safe_load((ROOT / "deploy" / "k8s" / "examples" / "bank-pvc.yaml").read_text())
    assert env["STORAGE_URI"].split("/")[2] == pvc["metadata"]["name"]


def test_autoscaling_uses_the_fields_kserve_reads(isvc: dict[str, Any]) -> None:
    """KServe's HPA reconciler reads the predictor's scaleMetric/scaleTarget; the
    annotations once used for them are ignored, so none may stand in for them."""
    predictor = isvc["spec"]["predictor"]
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("cpu", 70)
    annotations = isvc["metadata"].get("annotations", {})
    assert not {"serving.kserve.io/metric", "serving.kserve.io/metrics",
                "serving.kserve.io/targetUtilizationPercentage"} & set(annotations)
