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
    nonlinear = head_nonlinearity(imported.model, imported.spec.input_shape)
    if nonlinear is not None:
        after = "" if req.features is None else f" {req.features!r}"
        raise ValueError(
            f"the head (what follows the features{after}) "
            f"is not affine in the features ({nonlinear}): conceptguard needs logits = "
            "W z + b (its detectors, trust model and fused graph read W and b). With --onnx, "
            "name as --features the input of the last linear layer, before any softmax")
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


def head_nonlinearity(model, input_shape: tuple[int, ...], n: int = 16, seed: int = 0
                      ) -> str | None:
    """Why ``model``'s head is not affine in its features, or None: an affine map keeps
    affine combinations, ``h(a z1 + (1 - a) z2) = a h(z1) + (1 - a) h(z2)`` for every
    ``a``, so the head is run on combinations of the features of random inputs and
    compared with the same combinations of its outputs (a = 0.5, -3, 16, 64). Exact for
    any feature size with ``n`` inputs (a least-squares fit would need more inputs than
    features)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *input_shape), generator=gen)
    with torch.no_grad():
        z = model.features(x)
        z1, z2 = z[: n // 2], z[n // 2:]
        h1, h2 = model.head_logits(z1), model.head_logits(z2)
        # far outside the inputs' span too: a softmax over logits near 0 (an untrained
        # head) is almost affine near them, and the farther combinations show it
        for alpha in (0.5, -3.0, 16.0, 64.0):
            got = model.head_logits(alpha * z1 + (1 - alpha) * z2)
            want = alpha * h1 + (1 - alpha) * h2
            err = float((got - want).abs().max())
            # float32 rounding of an affine head and of the combination: about
            # 2 |a| eps |h| (1e-5 of the logits' size at a = 64), far below a thousandth
            scale = max(float(want.abs().max()), float(got.abs().max()), 1.0)
            if not err <= 1e-3 * scale:
                return (f"at a = {alpha:g} its outputs differ by {err:.3g} from the "
                        f"combination of its outputs, on logits of size {scale:.3g}")
    return None


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
