"""The import direction of docs/design.md ("Who owns what, and what may import what"),
checked on the source with a small AST walk: every ``import`` and ``from ... import``,
at module level or inside a function (a lazy import is still a dependency).

- ``conceptguard/`` (the core) imports neither ``offline`` nor ``service``;
- ``offline/`` does not import ``service``, except lazily (inside a function) in
  ``offline/cli.py``: the ``serve`` command starts the server;
- an offline command module (``pipeline``: build-bank, ``inject_faults``, ``diagnose``,
  ``concept_check``, ``import_classifier``, ``folder_config``) is imported by
  ``offline/cli.py`` only, except ``concept_check``, which build-bank also runs as a stage:
  commands share the build through ``offline/build_context.py``, never through each other;
- no route module (``service/routes_*.py``, ``service/*_route.py``,
  ``service/grpc_server.py``) imports another one;
- only the app (``service/app.py``, and ``service/ray_serve.py``, which wraps it) imports a
  route module: the codecs, the data plane and the rest never do;
- inside ``service/``, imports point down its layers (:data:`SERVICE_LAYERS`, the table of
  docs/design.md: app, transports, transport helpers, data plane, codecs, the served bank,
  metrics, base), never up; every service module has its layer.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("conceptguard", "offline", "service")
APP_MODULES = frozenset({"service.app", "service.ray_serve"})
COMMANDS = {f"offline.{m}": frozenset({"offline.cli"}) for m in (
    "pipeline", "inject_faults", "diagnose", "import_classifier", "folder_config")}
COMMANDS["offline.concept_check"] = frozenset({"offline.cli", "offline.pipeline"})
# top to bottom; a module imports its own layer or one below it (routes: is_route)
SERVICE_LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("app", frozenset({"app", "ray_serve"})),
    ("transports", frozenset()),
    ("transport helpers", frozenset({"middleware", "v2_binary", "oip", "feedback", "sink",
                                     "openapi", "schemas", "admin_auth"})),
    ("data plane", frozenset({"dataplane", "batching"})),
    ("codecs", frozenset({"codecs"})),
    ("the served bank", frozenset({"runtime_state", "bank_loader", "bank_summary",
                                   "bank_paths", "sidecar_head", "operating", "lifecycle"})),
    ("metrics", frozenset({"batch_metrics", "metrics_export"})),
    ("base", frozenset({"errors", "settings", "shared_state", "logs", "protocol",
                        "admission_hold", "metrics"})),
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "service.codecs"
    target: str  # the imported module, e.g. "service.routes_v1"
    lazy: bool  # inside a function


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(root: Path, dotted: str) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(root: Path, path: Path) -> list[Import]:
    """Every import in one file, relative ones resolved against its package."""
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend(Import(name, a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # "from service import codecs" imports the submodule service.codecs
                subs = [f"{base}.{a.name}" for a in child.names
                        if _is_module(root, f"{base}.{a.name}")]
                found.extend(Import(name, sub, lazy) for sub in subs)
                if not subs:
                    found.append(Import(name, base, lazy))
            visit(child, inner)

    visit(tree, False)
    return found


def all_imports(root: Path) -> list[Import]:
    out: list[Import] = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "proto" in path.relative_to(root).parts:  # generated gRPC stubs
                continue
            out.extend(imports_of(root, path))
    return out


def is_route(module: str) -> bool:
    if not module.startswith("service."):
        return False
    leaf = module.removeprefix("service.")
    return "." not in leaf and (leaf.startswith("routes_") or leaf.endswith("_route")
                                or leaf == "grpc_server")


def service_layer(module: str) -> int | None:
    """The index in :data:`SERVICE_LAYERS` of a ``service.`` module; None when it has none
    (the package itself and the generated gRPC stubs are outside the layers)."""
    if is_route(module):
        return 1
    leaf = module.removeprefix("service.")
    for i, (_, members) in enumerate(SERVICE_LAYERS):
        if leaf in members:
            return i
    return None


def _layered(module: str) -> bool:
    return module.startswith("service.") and not module.startswith("service.proto")


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(root: Path) -> list[str]:
    """Every import that breaks the direction, as ``importer -> imported (why)``."""
    bad = []
    for imp in all_imports(root):
        where = f"{imp.module} -> {imp.target}"
        if in_package(imp.module, "conceptguard") and (
                in_package(imp.target, "offline") or in_package(imp.target, "service")):
            bad.append(f"{where} (the core imports neither offline nor service)")
        if in_package(imp.module, "offline") and in_package(imp.target, "service") and not (
                imp.module == "offline.cli" and imp.lazy):
            bad.append(f"{where} (offline imports service only lazily, in offline.cli)")
        if imp.target in COMMANDS and imp.module not in COMMANDS[imp.target] | {imp.target}:
            bad.append(f"{where} (a command module is imported by offline.cli only)")
        if is_route(imp.target) and imp.module not in APP_MODULES and imp.target != imp.module:
            why = ("a route module imports another" if is_route(imp.module)
                   else "only the app imports route modules")
            bad.append(f"{where} ({why})")
        elif _layered(imp.module) and _layered(imp.target):
            up, down = service_layer(imp.module), service_layer(imp.target)
            if up is not None and down is not None and down < up:
                bad.append(f"{where} (service imports point down its layers: "
                           f"{SERVICE_LAYERS[up][0]} imports {SERVICE_LAYERS[down][0]})")
    for path in sorted((root / "service").glob("*.py")):
        module = module_name(root, path)
        if module != "service" and service_layer(module) is None:
            bad.append(f"{module} (a service module without a layer: SERVICE_LAYERS and "
                       "docs/design.md)")
    return bad


def test_the_repository_keeps_the_import_direction() -> None:
    assert violations(REPO) == []


def test_the_rules_are_what_the_check_enforces() -> None:
    """The check itself: the real tree has imports of each kind it allows, so an empty
    list above is not an empty walk."""
    found = all_imports(REPO)
    assert any(i.module == "service.app" and is_route(i.target) for i in found)
    assert any(i.module == "offline.cli" and i.target.startswith("service.") and i.lazy
               for i in found)
    assert any(i.module.startswith("service.") and i.target == "service.codecs"
               for i in found)
    assert any(i.module == "offline.cli" and i.target == "offline.pipeline" for i in found)
    assert any(i.module == "offline.inject_faults" and i.target == "offline.build_context"
               for i in found)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in {"conceptguard/__init__.py": "", "offline/__init__.py": "",
                      "service/__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_each_kind_of_violation_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "conceptguard/core.py": "def f():\n    from service import settings\n",
        "offline/job.py": "import service.codecs\n",
        "offline/diagnose.py": "from offline.pipeline import Context\n",
        "offline/pipeline.py": "def f():\n    from offline import concept_check\n",
        "offline/concept_check.py": "",
        "offline/cli.py": "from service.app import app\n\ndef serve():\n"
                          "    from service.settings import Settings\n",
        "service/codecs.py": "from .routes_v1 import router\n",
        "service/routes_v1.py": "from service import routes_v2\n",
        "service/routes_v2.py": "",
        "service/settings.py": "",
        "service/app.py": "from service.routes_v1 import router\n",
        "service/dataplane.py": "from service import middleware, codecs\n",
        "service/middleware.py": "from service.dataplane import DataPlane\n",
        "service/newcomer.py": "",
    })
    found = violations(root)
    assert found == [
        "conceptguard.core -> service.settings "
        "(the core imports neither offline nor service)",
        "offline.cli -> service.app (offline imports service only lazily, in offline.cli)",
        "offline.diagnose -> offline.pipeline (a command module is imported by offline.cli "
        "only)",
        "offline.job -> service.codecs (offline imports service only lazily, in offline.cli)",
        "service.codecs -> service.routes_v1 (only the app imports route modules)",
        "service.dataplane -> service.middleware (service imports point down its layers: "
        "data plane imports transport helpers)",
        "service.routes_v1 -> service.routes_v2 (a route module imports another)",
        "service.newcomer (a service module without a layer: SERVICE_LAYERS and "
        "docs/design.md)",
    ], found
