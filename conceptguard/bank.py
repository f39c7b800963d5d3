"""The bank: the versioned folder between the offline job and the service.

``manifest.json`` (this module's :class:`Manifest`), ``tensors.safetensors`` (aligner,
concept matrix, standardisation, heatmaps, class statistics, heads), ``classifier.onnx``
(the serving graph), ``classifier.safetensors`` (the classifier's weights, for the torch
runtime and for the hash check), optionally ``monitor.onnx`` (the fused graph: the serving
graph and the monitor, images in, every score out; used only when the manifest lists its
checksum, so banks written before it existed load as before) and ``report/``. Never pickle.

Loading checks the schema version, every file's sha256, the classifier hash, the shapes and
that every tensor is finite,
and refuses a corrupt or mismatched bank with :class:`BankError` naming what is wrong.
Saving stages the whole folder beside the target and swaps it in with renames.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.numpy import load_file, save_file

from conceptguard.atomic import atomic_write_text, replace_folder
from conceptguard.monitor_io import monitor_from_tensors, monitor_shapes
from conceptguard.projection import PROJECTION_KEYS
from conceptguard.scoring import Monitor
from conceptguard.trust import feature_names

SCHEMA_VERSION = 3  # what this build writes
# 2: no calibration map (identity) and no operating curve; 3 adds the map's knots
# (``trust.calibration.{x,y}``), ``threshold.raw`` and ``calibration.operating_curve``
READABLE_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
ONNX = "classifier.onnx"
CLASSIFIER = "classifier.safetensors"
FUSED_ONNX = "monitor.onnx"
CHECKED_FILES = (TENSORS, ONNX, CLASSIFIER)
OPTIONAL_FILES = (FUSED_ONNX,)  # checked when the manifest lists them


class BankError(ValueError):
    """The bank is missing, corrupt or does not match what the caller expects."""


class ConceptEntry(BaseModel):
    name: str
    prompts: list[str]


class ClassifierInfo(BaseModel):
    hash: str
    spec: dict[str, Any]
    feature_dim: int
    test_accuracy: float | None = None


class Preprocessing(BaseModel):
    input_size: int
    channels: int
    resize: str = "bilinear"
    value_range: tuple[float, float] = (0.0, 1.0)
    note: str = "mean/std normalisation is inside the exported model"


class Dims(BaseModel):
    classes: int
    concepts: int
    features: int
    vlm: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: int
    bank_id: str
    created_at: str
    name: str
    classes: list[str]
    concept_set: str
    concepts: list[ConceptEntry]
    vlm: dict[str, Any]
    classifier: ClassifierInfo
    preprocessing: Preprocessing
    dims: Dims
    data: dict[str, Any]
    attacks: list[dict[str, Any]]
    heatmaps: dict[str, Any]
    calibration: dict[str, Any]
    threshold: dict[str, Any]
    signal_features: list[str]
    files: dict[str, str]
    evaluation: dict[str, Any] = {}
    timings_s: dict[str, float] = {}
    # {"written": true}, or {"written": false, "fallback": ..., "reason": ...} when a
    # detector had no fused form (build-bank's fused_graph stage); {} for older banks
    fused_graph: dict[str, Any] = {}

    @property
    def concept_names(self) -> list[str]:
        return [c.name for c in self.concepts]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expected_shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    c, k, f, m = d.classes, d.concepts, d.features, d.vlm
    shapes: dict[str, tuple[int, ...]] = {
        "aligner.W": (f, m), "aligner.b": (m,), "concepts.T": (k, m), "classes.T": (c, m),
        "projection.mu": (k,), "projection.sigma": (k,),
        **monitor_shapes(c, k, f),
    }
    for view in ("model", "vlm"):
        for h in ("gt", "out", "ok", "bad", "adv", "diff", "diff_adv"):
            shapes[f"heatmaps.{view}.{h}"] = (c, k)
    return shapes


@dataclass(frozen=True)
class Bank:
    path: Path
    manifest: Manifest
    tensors: dict[str, np.ndarray]
    monitor: Monitor

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX

    @property
    def classifier_path(self) -> Path:
        return self.path / CLASSIFIER

    @property
    def fused_onnx_path(self) -> Path | None:
        """The fused graph (``monitor.onnx``) when the manifest lists it, else None."""
        return self.path / FUSED_ONNX if FUSED_ONNX in self.manifest.files else None

    def projection(self) -> dict[str, np.ndarray]:
        """The concept-projection tensors (see :func:`conceptguard.projection.project_features`)."""
        return {k: self.tensors[k] for k in PROJECTION_KEYS}


def _read_manifest(path: Path) -> Manifest:
    mpath = path / MANIFEST
    try:
        if not path.is_dir():
            raise BankError(f"bank folder {path} " + ("is a file, not a bank folder"
                                                      if path.exists() else "does not exist"))
        if not mpath.is_file():
            raise BankError(f"{mpath} is missing: not a bank folder")
        text = mpath.read_bytes().decode("utf-8")
    except OSError as exc:  # e.g. a path component over the file system's name limit
        raise BankError(f"bank folder {path} cannot be read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise BankError(f"{mpath} is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BankError(f"{mpath} is not valid JSON: {exc}") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise BankError(f"{mpath}: schema_version {version!r}, this build reads "
                        f"{' and '.join(map(str, READABLE_VERSIONS))}; rebuild the bank "
                        "with this version")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise BankError(f"{mpath}: field {field!r}: {err['msg']} ({exc.error_count()} "
                        "error(s) against the manifest schema)") from exc
    _check_manifest_values(mpath, manifest)
    return manifest


def _check_manifest_values(mpath: Path, m: Manifest) -> None:
    """Values the schema's types do not pin down; each error names the field."""
    for key in ("value", "raw"):
        if key == "raw" and key not in m.threshold:  # banks without a calibration map
            continue
        value = m.threshold.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BankError(f"{mpath}: field 'threshold.{key}' must be a number, got "
                            f"{type(value).__name__ if value is not None else 'nothing'}")
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise BankError(f"{mpath}: field 'threshold.{key}' must be a finite number in "
                            f"[0, 1], got {value!r}")
    for field, n in (("dims.classes", m.dims.classes), ("dims.concepts", m.dims.concepts),
                     ("dims.features", m.dims.features), ("dims.vlm", m.dims.vlm),
                     ("preprocessing.input_size", m.preprocessing.input_size)):
        if not 1 <= n <= 1_000_000:
            raise BankError(f"{mpath}: field {field!r} must be in [1, 1000000], got {n}")
    if m.preprocessing.channels not in (1, 3):
        raise BankError(f"{mpath}: field 'preprocessing.channels' must be 1 or 3, got "
                        f"{m.preprocessing.channels}")
    if len(set(m.classes)) != len(m.classes):
        raise BankError(f"{mpath}: field 'classes' has duplicate names")


def _check_files(path: Path, manifest: Manifest) -> None:
    listed = [n for n in OPTIONAL_FILES if n in manifest.files]
    for name in (*CHECKED_FILES, *listed):
        f = path / name
        if f.is_symlink():
            raise BankError(f"bank file {f} is a symbolic link; banks hold plain files")
        if not f.is_file():
            raise BankError(f"bank file {f} is missing")
        want = manifest.files.get(name)
        if want is None:
            raise BankError(f"{path / MANIFEST} lists no checksum for {name}")
        got = sha256_file(f)
        if got != want:
            raise BankError(f"bank file {f} is corrupt or was replaced: sha256 {got[:12]}… "
                            f"!= manifest {want[:12]}…")


def _check_shapes(manifest: Manifest, tensors: dict[str, np.ndarray]) -> None:
    d = manifest.dims
    if len(manifest.classes) != d.classes or len(manifest.concepts) != d.concepts:
        raise BankError("manifest: class or concept lists disagree with dims")
    if manifest.signal_features != feature_names():
        raise BankError(f"bank was calibrated on signals {manifest.signal_features}, this "
                        f"build computes {feature_names()}; rebuild the bank")
    for name, shape in expected_shapes(d).items():
        if name not in tensors:
            raise BankError(f"tensor {name!r} is missing from {TENSORS}")
        if tuple(tensors[name].shape) != shape:
            raise BankError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                            f"expected {shape}")


def _check_finite(tensors: dict[str, np.ndarray]) -> None:
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype.kind in "fc" and not np.isfinite(t).all():
            bad = int(t.size - np.count_nonzero(np.isfinite(t)))
            raise BankError(f"tensor {name!r} holds {bad} NaN or infinite value(s)")


PROBE_BATCH = 4


def probe_images(bank: Bank, n: int = PROBE_BATCH) -> np.ndarray:
    """A fixed probe batch: black, white, mid-grey and a seeded noise image in [0, 1]."""
    p = bank.manifest.preprocessing
    shape = (p.channels, p.input_size, p.input_size)
    fills = [np.zeros(shape), np.ones(shape), np.full(shape, 0.5),
             np.random.default_rng(0).random(shape)]
    return np.stack([fills[i % len(fills)] for i in range(n)]).astype(np.float32)


def load_bank(path: Path | str, expected_classifier_hash: str | None = None) -> Bank:
    """Load and validate a bank folder."""
    from conceptguard.classifier.hashing import verify_classifier_hash  # no torch

    path = Path(path)
    manifest = _read_manifest(path)
    _check_files(path, manifest)
    try:
        tensors = load_file(str(path / TENSORS))
    except Exception as exc:  # safetensors raises its own error types
        raise BankError(f"{path / TENSORS} is not a readable safetensors file: {exc}") from exc
    _check_shapes(manifest, tensors)
    _check_finite(tensors)
    try:
        _, stored = verify_classifier_hash(path / CLASSIFIER)
    except (ValueError, OSError) as exc:
        raise BankError(f"{path / CLASSIFIER} is not a valid classifier: {exc}") from exc
    if stored != manifest.classifier.hash:
        raise BankError(f"classifier hash mismatch: {CLASSIFIER} hashes to {stored[:12]}…, "
                        f"the manifest says {manifest.classifier.hash[:12]}…")
    if expected_classifier_hash and expected_classifier_hash != manifest.classifier.hash:
        raise BankError(f"bank was built for classifier {manifest.classifier.hash[:12]}…, "
                        f"expected {expected_classifier_hash[:12]}…")
    try:
        monitor = monitor_from_tensors(tensors, raw_threshold(manifest))
    except (KeyError, ValueError) as exc:
        raise BankError(f"{path / TENSORS}: the monitor cannot be built: {exc}") from exc
    if "raw" in manifest.threshold:
        want = monitor.calibrated_threshold
        if abs(want - float(manifest.threshold["value"])) > 1e-9:
            raise BankError(f"{path / MANIFEST}: field 'threshold.value' "
                            f"{manifest.threshold['value']!r} is not the calibration map of "
                            f"'threshold.raw' ({want!r})")
    return Bank(path, manifest, tensors, monitor)


def raw_threshold(manifest: Manifest) -> float:
    """The reject threshold on the trust model's own scale: ``threshold.raw`` where the bank
    has a calibration map (``threshold.value`` is then on the calibrated scale, the scale of
    the ``trust`` the service returns), else ``threshold.value`` (identity map)."""
    return float(manifest.threshold.get("raw", manifest.threshold["value"]))


def write_tensors(folder: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(folder / TENSORS))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Fill the file checksums, then write ``manifest.json`` atomically."""
    manifest.files = {name: sha256_file(folder / name)
                      for name in (*CHECKED_FILES, *OPTIONAL_FILES)
                      if (folder / name).is_file()}
    atomic_write_text(folder / MANIFEST, manifest.model_dump_json(indent=2))


def replaceable(target: Path) -> str | None:
    """None when a bank may be written at ``target`` (nothing there, an empty folder, or a
    bank: a folder with a manifest), else why not: a build never replaces anything else."""
    if not target.exists() and not target.is_symlink():
        return None
    if target.is_symlink():
        return (f"{target} is a symbolic link; give --out the folder it points to, or a new "
                f"folder")
    if not target.is_dir():
        return f"{target} exists and is not a folder; give --out a new folder"
    if (target / MANIFEST).is_file() or not any(target.iterdir()):
        return None
    return (f"{target} is a folder that is not a bank (no {MANIFEST}); a build replaces the "
            f"whole folder, so give --out a new or empty folder, or a bank to rebuild")


def publish(staging: Path, target: Path) -> None:
    """Swap ``staging`` in as ``target``: the old bank stays whole until the last rename.
    Refuses (:class:`BankError`) a ``target`` that is neither absent, empty nor a bank."""
    problem = replaceable(target)
    if problem is not None:
        raise BankError(problem)
    replace_folder(staging, target)


def check_bank_quickly(path: Path | str) -> Manifest:
    """The cheap part of :func:`load_bank` (manifest, files present), for a startup that
    must fail at once on an obviously wrong bank; the full checks follow."""
    path = Path(path)
    manifest = _read_manifest(path)
    for name in (*CHECKED_FILES, *(n for n in OPTIONAL_FILES if n in manifest.files)):
        if not (path / name).is_file():
            raise BankError(f"bank file {path / name} is missing")
    return manifest
