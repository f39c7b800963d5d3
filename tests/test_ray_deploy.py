"""The Ray deployment files: ``deploy/ray/serve_config.yaml`` against Ray Serve's own config
schema (``ray.serve.schema.ServeDeploySchema``), the RayService's ``serveConfigV2`` equal to
it, and ``deploy/ray/rayservice.yaml`` against ``deploy/ray/rayservice.schema.json``.

What that schema is: HAND-WRITTEN. The KubeRay CRD is not shipped by any package on PyPI or
npm (see deploy/README.md, "Ray", for what was looked for), so the schema lists the ray.io/v1
RayService fields of KubeRay's v1 API types (names, types, required fields), rejects unknown
ones, and refers to the Kubernetes schemas that kubernetes-validate ships for the pod
templates, ObjectMeta and Service. It catches misspelt or misplaced fields and wrong types;
it is not the operator's own validation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.schema_checks import errors, k8s_validator, with_value

ROOT = Path(__file__).resolve().parents[1]
RAY = ROOT / "deploy" / "ray"
SERVE_CONFIG = RAY / "serve_config.yaml"
RAYSERVICE = RAY / "rayservice.yaml"
SCHEMA = RAY / "rayservice.schema.json"
# set by the pods of the RayService, never by the shared Serve config
POD_ENV = {"CONCEPTGUARD_BANK", "CONCEPTGUARD_BANKS_ROOT", "CONCEPTGUARD_STATE_DIR",
           "PROMETHEUS_MULTIPROC_DIR"}


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return yaml.safe_load(SERVE_CONFIG.read_text())


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return yaml.safe_load(RAYSERVICE.read_text())


@pytest.fixture(scope="module")
def validator() -> Any:
    return k8s_validator(SCHEMA)



def _serve_schema() -> Any:
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema


def _unknown_keys(config: dict[str, Any]) -> list[str]:
    """Keys Serve's schema has no field for (it ignores them: a misspelt field is silently
    dropped, so this is checked here)."""
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    out = [k for k in config if k not in ServeDeploySchema.model_fields]
    out += [f"http_options.{k}" for k in config.get("http_options", {})
            if k not in HTTPOptionsSchema.model_fields]
    for i, app in enumerate(config.get("applications", [])):
        out += [f"applications.{i}.{k}" for k in app
                if k not in ServeApplicationSchema.model_fields]
    return out


def test_serve_config_is_a_valid_serve_deploy_config(serve_config: dict[str, Any]) -> None:
    schema = _serve_schema()
    parsed = schema.model_validate(serve_config)
    (app,) = parsed.applications
    assert app.import_path == "service.ray_serve:app" and app.route_prefix == "/"
    assert parsed.http_options.port == 8000
    assert _unknown_keys(serve_config) == []


def test_serve_config_checks_reject_a_broken_config(serve_config: dict[str, Any]) -> None:
    """The checks above can fail: Serve's schema refuses a wrong type or a missing field,
    the key check a misspelt one."""
    schema = _serve_schema()
    from ray._common.pydantic_compat import ValidationError

    for damage in (lambda c: c["http_options"].update(port="eighty"),
                   lambda c: c["applications"][0].pop("import_path")):
        broken = copy.deepcopy(serve_config)
        damage(broken)
        with pytest.raises(ValidationError):
            schema.model_validate(broken)
    broken = copy.deepcopy(serve_config)
    broken["applications"][0]["import_pth"] = "x:y"
    broken["http_options"]["prot"] = 80
    assert _unknown_keys(broken) == ["http_options.prot", "applications.0.import_pth"]


def test_serve_config_args_are_known_to_the_builder(serve_config: dict[str, Any]) -> None:
    """``args`` are RaySettings fields plus ``env``; ``env`` holds service settings only; the
    builder accepts them and refuses a misspelt knob."""
    pytest.importorskip("ray.serve")
    from service.ray_serve import RaySettings, build
    from service.settings import ENV_PREFIX, Settings

    args = serve_config["applications"][0]["args"]
    assert set(args) - {"env"} <= set(RaySettings.model_fields)
    for key in args["env"]:
        assert key.startswith(ENV_PREFIX), key
        assert key[len(ENV_PREFIX):].lower() in Settings.model_fields, key
    assert not POD_ENV & set(args["env"]), "paths belong to the pods' environment"
    assert build(copy.deepcopy(args)) is not None
    with pytest.raises(ValueError, match="max_replica"):
        build({**copy.deepcopy(args), "max_replica": 8})


def test_rayservice_serves_the_same_serve_config(serve_config: dict[str, Any],
                                                 rayservice: dict[str, Any]) -> None:
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"]) == serve_config


def test_rayservice_validates(validator: Any, rayservice: dict[str, Any]) -> None:
    assert errors(validator, rayservice) == []


@pytest.mark.parametrize(("path", "value", "mentions"), [
    (("spec", "rayClusterConfg"), {}, "rayClusterConfg"),  # unknown RayService field
    (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"), 0,
     "string"),  # rayStartParams values are strings
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplicas"), "4", "integer"),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
      "volumeMount"), [], "volumeMount"),  # unknown field in a Kubernetes type
    (("apiVersion",), "ray.io/v1alpha1", "ray.io/v1"),
])
def test_schema_rejects_broken_services(validator: Any, rayservice: dict[str, Any],
                                        path: tuple[Any, ...], value: Any,
                                        mentions: str) -> None:
    doc = with_value(rayservice, path, value)
    found = errors(validator, doc)
    assert found and any(mentions in e for e in found), found


def test_schema_requires_a_head_group(validator: Any, rayservice: dict[str, Any]) -> None:
    doc = copy.deepcopy(rayservice)
    del doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert any("headGroupSpec" in e for e in errors(validator, doc))


def test_rayservice_pods_mount_what_their_env_names(rayservice: dict[str, Any]) -> None:
    """Every pod: the bank under the read-only banks volume, the state folder on the shared
    (ReadWriteMany) volume, a per-pod metrics folder; head and workers alike."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert set(env) >= POD_ENV
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert env["CONCEPTGUARD_BANK"].startswith(env["CONCEPTGUARD_BANKS_ROOT"] + "/")
        assert mounts[env["CONCEPTGUARD_BANKS_ROOT"]].get("readOnly") is True
        state = volumes[mounts[env["CONCEPTGUARD_STATE_DIR"]]["name"]]
        assert state["persistentVolumeClaim"]["claimName"] == "conceptguard-state"
        metrics = volumes[mounts[env["PROMETHEUS_MULTIPROC_DIR"]]["name"]]
        assert "emptyDir" in metrics
        ports = {p["containerPort"] for p in container["ports"]}
        assert 8080 in ports and group["rayStartParams"]["metrics-export-port"] == "8080"
    for group in cluster["workerGroupSpecs"]:  # scraped for the app's metrics: the proxy
        (container,) = group["template"]["spec"]["containers"]
        assert 8000 in {p["containerPort"] for p in container["ports"]}
    assert cluster["rayVersion"] == pytest.importorskip("ray").__version__


def test_rayservice_workers_are_ready_without_wget_and_their_claims_exist(
        rayservice: dict[str, Any]) -> None:
    """KubeRay gives a RayService worker without a readiness probe one that runs ``wget``,
    which the slim image lacks: each worker sets its own, an HTTP check of the node's Serve
    proxy on the serve port. Every claim the pods mount is defined in deploy/."""
    claims = set()
    groups = [rayservice["spec"]["rayClusterConfig"]["headGroupSpec"],
              *rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for group in groups:
        for volume in group["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claims.add(volume["persistentVolumeClaim"]["claimName"])
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            probe = container["readinessProbe"]
            serve = {p["name"]: p["containerPort"] for p in container["ports"]}["serve"]
            assert probe["httpGet"] == {"path": "/-/healthz", "port": serve}
            assert "exec" not in probe
    defined = set()
    for path in ROOT.glob("deploy/**/*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "PersistentVolumeClaim":
                defined.add(doc["metadata"]["name"])
    assert claims and claims <= defined, claims - defined
