"""Builds ``inferenceservice.schema.json``: a JSON schema of ``serving.kserve.io/v1beta1``
``InferenceService`` taken from the KServe Python client's generated models.

Where it comes from: the KServe CRD YAML is not published on PyPI, but the ``kserve``
package (0.21) ships the models that openapi-generator builds from KServe's OpenAPI spec,
itself generated from the same Go API types as the CRD's schema. Each model class lists its
fields (``attribute_map``: Python name -> JSON key) and their types (``openapi_types``); its
``__init__`` raises for the fields the API requires. This script reads those files (as text,
with ``ast``: kserve is not imported, so none of its dependencies are needed) and writes one
schema: every KServe object is strict (``additionalProperties: false``, required fields
required, types checked); the Kubernetes types they embed (Container, Probe, Volume,
ObjectMeta, ...) are ``$ref``'s into the Kubernetes OpenAPI definitions that
``kubernetes-validate`` ships, so the test resolves them against those.

    pip download --no-deps kserve==0.21.0 -d /tmp/kserve && \\
    python deploy/kserve/build_schema.py /tmp/kserve/kserve-0.21.0-py3-none-any.whl
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "inferenceservice.schema.json"
K8S = "https://kubernetes.io/api/_definitions.json#/$defs/"  # kubernetes-validate's $id
K8S_GROUPS = ("io.k8s.api.core.v1.", "io.k8s.apimachinery.pkg.apis.meta.v1.")
SPECIAL = {
    "str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
    "float": {"type": "number"}, "object": {}, "datetime": {"type": "string"},
    "date": {"type": "string"}, "ResourceQuantity": {"anyOf": [{"type": "string"},
                                                               {"type": "number"}]},
    "KnativeURL": {"type": "string"}, "V1Time": {"type": "string"},
    "KnativeAddressable": {"type": "object"}, "KnativeCondition": {"type": "object"},
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": {
        "$ref": K8S + "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"},
}
REQUIRED_RE = re.compile(r"Invalid value for `(\w+)`, must not be `None`")


def read_models(source: Path) -> dict[str, str]:
    """``{file name: source}`` of ``kserve/models/*.py`` from a wheel or a package folder."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as zf:
            return {Path(n).name: zf.read(n).decode() for n in zf.namelist()
                    if n.startswith("kserve/models/") and n.endswith(".py")}
    folder = source / "models" if (source / "models").is_dir() else source
    return {p.name: p.read_text() for p in folder.glob("*.py")}


def parse_model(text: str) -> tuple[str, dict[str, str], dict[str, str], list[str]] | None:
    for node in ast.parse(text).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, dict[str, str]] = {}
        for stmt in node.body:
            if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)
                    and stmt.targets[0].id in ("openapi_types", "attribute_map")):
                fields[stmt.targets[0].id] = ast.literal_eval(stmt.value)
        if len(fields) == 2:
            return (node.name, fields["openapi_types"], fields["attribute_map"],
                    REQUIRED_RE.findall(text))
    return None


def type_schema(t: str, models: set[str], k8s_names: dict[str, str],
                unknown: set[str]) -> dict:
    if t.startswith("list[") and t.endswith("]"):
        return {"type": "array", "items": type_schema(t[5:-1], models, k8s_names, unknown)}
    m = re.fullmatch(r"dict\(str, (.+)\)", t)
    if m:
        return {"type": "object",
                "additionalProperties": type_schema(m.group(1), models, k8s_names, unknown)}
    if t in SPECIAL:
        return SPECIAL[t]
    if t in models:
        return {"$ref": f"#/$defs/{t}"}
    if t.startswith("V1") and t[2:] in k8s_names:
        return {"$ref": K8S + k8s_names[t[2:]]}
    unknown.add(t)
    return {}


def k8s_definition_names() -> dict[str, str]:
    """Short name -> full Kubernetes definition name (core/v1 and meta/v1 first)."""
    import kubernetes_validate

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    latest = sorted(p for p in root.iterdir() if p.name.endswith("-local-strict"))[-1]
    defs = json.loads((latest / "_definitions.json").read_text())["$defs"]
    out: dict[str, str] = {}
    for group in K8S_GROUPS:
        for name in defs:
            if name.startswith(group):
                out.setdefault(name[len(group):], name)
    return out


def build(source: Path) -> dict:
    parsed = [p for p in map(parse_model, read_models(source).values()) if p]
    models = {name for name, *_ in parsed}
    k8s_names = k8s_definition_names()
    unknown: set[str] = set()
    definitions = {}
    for name, types, attrs, required in sorted(parsed):
        if not name.startswith("V1beta1"):
            continue
        props = {attrs[a]: type_schema(t, models, k8s_names, unknown) for a, t in types.items()}
        definitions[name] = {"type": "object", "properties": props,
                             "additionalProperties": False,
                             **({"required": [attrs[r] for r in required]} if required else {})}
    # keep only what an InferenceService reaches
    keep, todo = set(), ["V1beta1InferenceService"]
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        todo += re.findall(r'"#/\$defs/(\w+)"', json.dumps(definitions[name]))
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated by deploy/kserve/build_schema.py from the kserve 0.21 Python "
                    "client's models (openapi_types / attribute_map); Kubernetes types are "
                    "references into kubernetes-validate's _definitions.json.",
        "$ref": "#/$defs/V1beta1InferenceService",
        "$defs": {k: definitions[k] for k in sorted(keep)},
    }
    top = schema["$defs"]["V1beta1InferenceService"]
    top["properties"]["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    top["properties"]["kind"] = {"const": "InferenceService"}
    top["required"] = ["apiVersion", "kind", "metadata", "spec"]
    if unknown:
        print(f"types left open (any value): {sorted(unknown)}", file=sys.stderr)
    return schema


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    OUT.write_text(json.dumps(build(Path(sys.argv[1])), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
