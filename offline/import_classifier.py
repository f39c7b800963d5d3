"""``conceptguard import-classifier``: a torchvision checkpoint or an ONNX classifier into
the project's classifier file, checked against the source's logits before it is published."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conceptguard.atomic import atomic_path
from conceptguard.classifier.importing import (
    Imported,
    compare_logits,
    import_onnx,
    import_torchvision,
    read_state_dict,
)
from conceptguard.classifier.io import load_classifier, save_classifier
from conceptguard.classifier.onnx_module import conversion_errors


@dataclass(frozen=True)
class ImportRequest:
    """What the command line gives (normalisation already resolved)."""

    out: Path
    classes: list[str]
    input_size: int
    channels: int
    mean: list[float]
    std: list[float]
    torchvision: str | None = None
    weights: Path | None = None
    onnx: Path | None = None
    features: str | None = None


def import_classifier(req: ImportRequest) -> dict:
    """Import, check the logits, write ``req.out`` (only when the written file reproduces the
    source's logits); a summary for the command to print."""
    if (req.torchvision is None) == (req.onnx is None):
        raise ValueError("give either --torchvision ARCH --weights FILE or --onnx FILE")
    if len(set(req.classes)) != len(req.classes) or not all(req.classes):
        raise ValueError(f"class names must be distinct and non-empty: {req.classes}")
    imported = _import(req)
    diff, tol = compare_logits(imported.model, imported.source, imported.spec)
    _check(diff, tol, "the imported model")
    out = Path(req.out)
    with atomic_path(out, suffix=".importing") as tmp:  # published once it reproduces them
        digest = save_classifier(imported.model, imported.spec, tmp)
        reloaded, _, _ = load_classifier(tmp)  # what build-bank will read
        diff, tol = compare_logits(reloaded, imported.source, imported.spec)
        _check(diff, tol, "the written file")
    errors = conversion_errors(reloaded)
    return {"path": str(out), "hash": digest, "source": imported.origin,
            "classes": imported.spec.classes, "input": list(imported.spec.input_shape),
            "feature_dim": reloaded.feature_dim, "max_logit_difference": diff,
            "tolerance": tol, "gradients": not errors,
            **({"no_gradients_because": errors[0]} if errors else {})}


def _import(req: ImportRequest) -> Imported:
    common = (req.classes, req.input_size, req.channels, req.mean, req.std)
    if req.onnx is not None:
        return import_onnx(req.onnx, *common, features=req.features)
    if req.weights is None:
        raise ValueError("--torchvision needs --weights (a .safetensors file or a state dict)")
    if req.features is not None:
        raise ValueError("--features applies to --onnx only")
    return import_torchvision(str(req.torchvision), read_state_dict(req.weights), *common)


def _check(diff: float, tol: float, what: str) -> None:
    if not diff <= tol:
        raise ValueError(f"{what} does not reproduce the source's logits: largest difference "
                         f"{diff:.3g} > tolerance {tol:.3g}")
