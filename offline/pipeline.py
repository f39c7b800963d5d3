"""build-bank: from a dataset and a classifier to a validated bank and its report.

The job is a list of named stages (:data:`BUILD_STAGES`) over a typed build state
(:class:`BuildState`): each stage is a function ``(ctx, state) -> output`` that reads the
outputs of earlier stages from ``state`` and returns its own (a small frozen dataclass, or an
array batch), which the runner (:func:`run_stages`) stores under the stage's name, timing it
and printing progress. Stages: data, classifier (features), vlm (texts and image
embeddings), aligner, projection, export (ONNX), served_outputs, adversarial, fitting stream,
heatmaps, calibration, evaluation_sets, evaluation, vlm (the test images), fault
localisation, concept check (where concepts may be named), tensors, fused graph
(``monitor.onnx``), report.

The per-image work (classifier features, VLM embeddings, attacks, served outputs, scoring)
goes through one call, :meth:`Context.map`: the engine (:mod:`offline.engine`: this process,
or Ray Data) runs the stage function of :mod:`offline.stages`, and the expensive ones are
cached (``offline.cache``) under a key of every input that determines them. The math lives
in ``conceptguard``; this module only orchestrates and does I/O.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptguard import bank as bankio
from conceptguard.aligner import Aligner, fit_aligner, mean_cosine, r2_score
from conceptguard.atomic import staging_dir
from conceptguard.attacks import AttackSpec
from conceptguard.calibration import Batch, FittedMonitor, fit_monitor
from conceptguard.classifier.inference import predict, to_tensor
from conceptguard.classifier.io import load_classifier
from conceptguard.classifier.onnx_module import conversion_errors
from conceptguard.concepts import ConceptSet, class_matrix, concept_matrix, load_concept_set
from conceptguard.data import Dataset, make_splits, open_source, sample_digest
from conceptguard.data.splits import Splits
from conceptguard.export import MonitoredClassifier, export_onnx
from conceptguard.faults import encoder_view_labels, fault_report, zero_shot_labels
from conceptguard.heatmaps import Heatmaps, binarise, build_heatmaps
from conceptguard.monitor_graph import (
    GraphDisagrees,
    check_fused_graph,
    export_fused_onnx,
    fusable,
)
from conceptguard.monitor_io import monitor_from_tensors, monitor_tensors
from conceptguard.projection import project_features, raw_concept_scores
from conceptguard.runtime import OnnxRuntime
from conceptguard.scoring import Monitor, Scores
from conceptguard.threads import single_threaded_blas
from conceptguard.trust import feature_names
from offline.build_context import Context, torch_features, vlm_embeddings
from offline.cache import ArrayCache
from offline.config import JobConfig
from offline.engine import Engine, LocalEngine
from offline.evaluate import evaluate
from offline.labelled_sets import attacked, evaluation_sets, fitting_stream
from offline.report import write_report
from offline.stages import IMAGE, attack_columns, scores_from_columns
from offline.streaming import (
    StreamedOutputs,
    oracle_indices,
    score_streamed,
    served_streamed,
    split_datasets,
)

log = logging.getLogger("conceptguard.build")

SERVE_CHUNK = 2048  # test-split rows per engine call (decoded, served, appended to disk)
SCORE_CHUNK = 4096  # test-split rows scored per engine call


@dataclass(frozen=True)
class BuildModels:
    """The per-image stages bound to this build's files (what :mod:`offline.labelled_sets`
    calls)."""

    ctx: Context
    classifier: Path
    onnx: Path

    def served(self, images: np.ndarray, labels: np.ndarray) -> Batch:
        """Outputs of the exported serving graph (the served-outputs stage)."""
        if len(images) == 0:
            raise ValueError("served: no images")
        out = self.ctx.map("served", {IMAGE: images}, onnx=str(self.onnx))
        return Batch(out["logits"], out["features"], out["concepts"],
                     np.asarray(labels).astype(np.int64))

    def served_columns(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The served-outputs stage's columns of ``images`` (one chunk of a streamed split)."""
        return self.ctx.map("served", {IMAGE: images}, onnx=str(self.onnx))

    def scores(self, monitor: Monitor, b: Batch) -> Scores:
        """The scoring stage on served outputs (one chunk of a streamed split)."""
        return scores_from_columns(self.ctx.map(
            "scoring", {"logits": b.logits, "features": b.features, "concepts": b.concepts},
            batch_size=SCORE_CHUNK, monitor=monitor))

    def attack(self, key: dict, images: np.ndarray, labels: np.ndarray, spec: AttackSpec,
               seed: int) -> np.ndarray:
        """Adversarial uint8 images of ``images`` (one run seeded ``seed``; cached)."""
        columns = {IMAGE: images, "label": np.asarray(labels, np.int64),
                   **attack_columns(len(images), seed)}
        return self.ctx.map("attack", columns, keep=("adversarial:images",),
                            cache=("adversarial-images", {**key, "seed": seed}),
                            classifier=str(self.classifier),
                            attack=spec.cache_fields())["images"]


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def _concept_set_digest(cs: ConceptSet) -> str:
    return hashlib.sha256(cs.model_dump_json().encode()).hexdigest()[:20]


# ------------------------------------------------------------------ stage outputs


@dataclass(frozen=True)
class DataOut:
    ds: dict[str, Dataset]  # fit, reference, calibration in memory; test maybe lazy
    splits: Splits
    key: str  # the data spec and split digest: the data part of every cache key
    classes: list[str]
    sample_digest: str  # a sample of what the splits hold (conceptguard.data.sample_digest)


@dataclass(frozen=True)
class ClassifierOut:
    model: torch.nn.Module
    spec: Any  # ClassifierSpec
    hash: str
    path: Path
    z_fit: np.ndarray
    z_ref: np.ndarray


@dataclass(frozen=True)
class VLMOut:
    concept_set: ConceptSet
    T: np.ndarray  # concept text embeddings (K, m)
    class_T: np.ndarray  # class prompt embeddings (C, m)
    v_fit: np.ndarray
    v_ref: np.ndarray


@dataclass(frozen=True)
class AlignerOut:
    aligner: Aligner
    info: dict


@dataclass(frozen=True)
class ProjectionOut:
    tensors: dict[str, np.ndarray]  # aligner, concepts and standardisation tensors
    o_mu: np.ndarray  # the VLM's own concept scores on the reference split: mean, std
    o_sigma: np.ndarray
    o_ref: np.ndarray


@dataclass(frozen=True)
class ExportOut:
    onnx: Path
    models: BuildModels


@dataclass(frozen=True)
class ServedOut:
    outs: dict[str, Batch]  # reference, calibration (in memory)
    test: StreamedOutputs  # the test split grows with the dataset: its outputs are on disk
    test_accuracy: float


@dataclass(frozen=True)
class HeatmapsOut:
    model: Heatmaps
    vlm: Heatmaps


@dataclass(frozen=True)
class EvalSetsOut:
    sets: dict[str, dict[str, Batch]]
    attempted: dict[str, int]


@dataclass(frozen=True)
class EvaluationOut:
    clean: Scores
    metrics: dict


@dataclass(frozen=True)
class VLMTestOut:
    idx: np.ndarray  # test rows the VLM embedded
    first_n: int  # the first ``first_n`` of them: the zero-shot sample
    v: np.ndarray
    outs: Batch  # the served outputs of those rows


@dataclass(frozen=True)
class FusedGraphOut:
    """The fused graph (``monitor.onnx``) build-bank wrote, or None and why it fell back to
    the classifier graph plus numpy scoring (a detector without a fused form)."""

    path: Path | None
    fallback: str | None = None

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's ``fused_graph``: whether the graph was written, else why not."""
        if self.path is not None:
            return {"written": True}
        return {"written": False, "fallback": "classifier.onnx + numpy scoring",
                "reason": self.fallback}


@dataclass
class BuildState:
    """Each stage's output under the stage's name; a field is unset until its stage ran
    (reading it earlier raises AttributeError), so a stage can be run alone on a state
    holding just what it reads."""

    data: DataOut = field(init=False)
    classifier: ClassifierOut = field(init=False)
    vlm: VLMOut = field(init=False)
    aligner: AlignerOut = field(init=False)
    projection: ProjectionOut = field(init=False)
    export: ExportOut = field(init=False)
    served_outputs: ServedOut = field(init=False)
    adversarial: Batch = field(init=False)
    fitting_stream: Batch = field(init=False)
    heatmaps: HeatmapsOut = field(init=False)
    calibration: FittedMonitor = field(init=False)
    evaluation_sets: EvalSetsOut = field(init=False)
    evaluation: EvaluationOut = field(init=False)
    vlm_test: VLMTestOut = field(init=False)
    fault_localisation: dict = field(init=False)
    concept_check: tuple[dict, dict] = field(init=False)
    tensors: dict = field(init=False)
    fused_graph: FusedGraphOut = field(init=False)
    report: bankio.Manifest = field(init=False)


# ------------------------------------------------------------------ stages


def data_stage(ctx: Context, state: BuildState) -> DataOut:
    cfg = ctx.cfg
    train, test = open_source(cfg.data)  # a folder source: an index, decoded on demand
    splits = make_splits(len(train), len(test), cfg.splits)
    ds = split_datasets(train, test, splits)  # test stays lazy: streamed by served_outputs
    return DataOut(ds, splits, f"{cfg.data.cache_key()}|{splits.digest()}",
                   train.classes, sample_digest(train, test, splits))


def classifier_stage(ctx: Context, state: BuildState) -> ClassifierOut:
    d = state.data
    path = Path(ctx.cfg.classifier.path)
    model, cspec, chash = load_classifier(path)
    if cspec.num_classes != len(d.classes):
        raise ValueError(f"classifier has {cspec.num_classes} classes, the dataset "
                         f"{len(d.classes)}")
    errors = conversion_errors(model)
    if errors:
        skip_attacks(ctx, f"no gradients: {errors[0]} (the imported ONNX graph runs in ONNX "
                          "Runtime)")
    z = {s: torch_features(ctx, path, chash, d.ds[s].images, s, d.key)
         for s in ("fit", "reference")}
    return ClassifierOut(model, cspec, chash, path, z["fit"], z["reference"])


def skip_attacks(ctx: Context, reason: str) -> None:
    """Build without attacks (no attacked inputs to fit on, evaluate or draw H_adv from):
    the progress output, metrics.json (``attacks_skipped``) and the manifest's empty
    ``attacks`` say so."""
    adv = ctx.cfg.adversarial.model_copy(update={"attacks": [], "fit_attacks": [],
                                                 "per_split": 0, "fit_per_attack": 0})
    ctx.cfg = ctx.cfg.model_copy(update={"adversarial": adv})
    ctx.attacks_skipped = reason
    print(f"attacks skipped: {reason}", file=sys.stderr, flush=True)


def vlm_stage(ctx: Context, state: BuildState) -> VLMOut:
    cfg, d, vlm = ctx.cfg, state.data, ctx.vlm
    cs = load_concept_set(cfg.concepts)
    names = cfg.class_prompts or d.classes
    texts = ctx.cached(
        "vlm-texts", {"vlm": vlm.id, "concepts": _concept_set_digest(cs), "classes": names},
        lambda: {"T": concept_matrix(vlm.get(), cs),
                 "C": class_matrix(vlm.get(), names, cs.class_templates, cs.class_aliases)})
    v = {s: vlm_embeddings(ctx, vlm, d.ds[s].images, f"{d.key}|{s}")
         for s in ("fit", "reference")}
    return VLMOut(cs, texts["T"], texts["C"], v["fit"], v["reference"])


def aligner_stage(ctx: Context, state: BuildState) -> AlignerOut:
    c, v = state.classifier, state.vlm
    aligner = fit_aligner(c.z_fit, v.v_fit, seed=ctx.cfg.seed)
    pred_ref = aligner.transform(c.z_ref)
    return AlignerOut(aligner, {
        "heldout_r2": round(r2_score(pred_ref, v.v_ref), 5),
        "heldout_cosine": round(mean_cosine(pred_ref, v.v_ref), 5),
        "lambda": aligner.lam, "fit_n": len(v.v_fit), "heldout_n": len(v.v_ref),
        "heldout_split": "reference"})


def projection_stage(ctx: Context, state: BuildState) -> ProjectionOut:
    a, T, v_ref = state.aligner.aligner, state.vlm.T, state.vlm.v_ref
    raw_ref = raw_concept_scores(state.classifier.z_ref.astype(np.float64),
                                 a.W.astype(np.float64), a.b.astype(np.float64),
                                 T.astype(np.float64))
    mu, sigma = raw_ref.mean(0), np.maximum(raw_ref.std(0), 1e-6)
    projection = {"aligner.W": a.W, "aligner.b": a.b, "concepts.T": T,
                  "projection.mu": mu.astype(np.float32),
                  "projection.sigma": sigma.astype(np.float32)}
    o_ref_raw = v_ref @ T.T
    o_mu, o_sigma = o_ref_raw.mean(0), np.maximum(o_ref_raw.std(0), 1e-6)
    return ProjectionOut(projection, o_mu, o_sigma, (o_ref_raw - o_mu) / o_sigma)


def export_stage(ctx: Context, state: BuildState) -> ExportOut:
    c, staging = state.classifier, ctx.staging
    shutil.copyfile(c.path, staging / bankio.CLASSIFIER)
    onnx = staging / bankio.ONNX
    export_onnx(MonitoredClassifier(c.model, state.projection.tensors), c.spec.input_shape,
                onnx)
    rt = OnnxRuntime(onnx, device="cpu")
    check_onnx_matches(rt, c.model, state.data.ds["test"].images[:64],
                       state.projection.tensors)
    return ExportOut(onnx, BuildModels(ctx, c.path, onnx))


def served_outputs_stage(ctx: Context, state: BuildState) -> ServedOut:
    ds, m = state.data.ds, state.export.models
    outs = {name: m.served(ds[name].images, ds[name].labels)
            for name in ("reference", "calibration")}
    t = served_streamed(m.served_columns, ds["test"], ctx.cfg.cache_dir / "tmp",
                        batch_size=SERVE_CHUNK)
    return ServedOut(outs, t, float((t.predictions == t.labels).mean()))


def _attack_key(state: BuildState) -> dict:
    return {"hash": state.classifier.hash, "data": state.data.key}


def adversarial_stage(ctx: Context, state: BuildState) -> Batch:
    """The heatmap attack on the reference split; its successful inputs (for H_adv)."""
    cfg = ctx.cfg
    adv, _ = attacked(state.export.models, {**_attack_key(state), "split": "reference"},
                      state.data.ds["reference"], state.served_outputs.outs["reference"],
                      cfg.adversarial.heatmap_attack, cfg.adversarial.per_split, cfg.seed + 1)
    return adv.select(adv.wrong)


def fitting_stream_stage(ctx: Context, state: BuildState) -> Batch:
    """The calibration split's labelled stream the monitor is fitted on."""
    return fitting_stream(state.export.models, ctx.cfg, _attack_key(state),
                          state.data.ds["calibration"],
                          state.served_outputs.outs["calibration"], ctx.cfg.seed)


def heatmaps_stage(ctx: Context, state: BuildState) -> HeatmapsOut:
    r, adv, k = state.served_outputs.outs["reference"], state.adversarial, ctx.cfg.heatmaps
    n = len(state.data.classes)
    return HeatmapsOut(
        build_heatmaps(r.concepts, r.labels, r.predictions, n, adv_scores=adv.concepts,
                       adv_predictions=adv.predictions, min_count=k.min_count),
        build_heatmaps(state.projection.o_ref, r.labels, r.predictions, n,
                       min_count=k.min_count))


def calibration_stage(ctx: Context, state: BuildState) -> FittedMonitor:
    return fit_monitor(state.served_outputs.outs["reference"], state.heatmaps.model,
                       state.fitting_stream, ctx.cfg.calibration, ctx.cfg.seed)


def evaluation_sets_stage(ctx: Context, state: BuildState) -> EvalSetsOut:
    sets, attempted = evaluation_sets(state.export.models, ctx.cfg, _attack_key(state),
                                      state.data.ds["test"], state.served_outputs.test,
                                      ctx.cfg.seed)
    return EvalSetsOut(sets, attempted)


def evaluation_stage(ctx: Context, state: BuildState) -> EvaluationOut:
    cfg, fitted, t = ctx.cfg, state.calibration, state.served_outputs.test
    models = state.export.models
    clean = score_streamed(partial(models.scores, fitted.monitor), t,
                           batch_size=SCORE_CHUNK)  # per-image scalars kept
    e = state.evaluation_sets
    metrics: dict = {
        "bank": cfg.name,
        "classifier": {"test_accuracy": round(state.served_outputs.test_accuracy, 5),
                       "hash": state.classifier.hash, "n_test": len(t)},
        "aligner": state.aligner.info,
        **evaluate(cfg, fitted, state.fitting_stream, clean, t.labels, e.sets, e.attempted,
                   cfg.seed, clean_probabilities=_probabilities(t)),
        "calibration": fitted.info,
    }
    if ctx.attacks_skipped:
        metrics["attacks_skipped"] = ctx.attacks_skipped
    return EvaluationOut(clean, metrics)


def _probabilities(outs) -> np.ndarray:
    """The predicted probabilities of streamed served outputs (N x C float32: small)."""
    parts = []
    for b in outs.batches(SCORE_CHUNK):
        z = np.asarray(b.logits, np.float64)
        z = np.exp(z - z.max(1, keepdims=True))
        parts.append((z / z.sum(1, keepdims=True)).astype(np.float32))
    return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)


def vlm_test_stage(ctx: Context, state: BuildState) -> VLMTestOut:
    """The oracle on test images: the first ``vlm_test_images`` and the misclassified ones
    after them (at most ``vlm_misclassified_max``: a seeded sample)."""
    t, d, e = state.served_outputs.test, state.data, ctx.cfg.evaluation
    idx, first_n = oracle_indices(t, e.vlm_test_images, e.vlm_misclassified_max,
                                  ctx.cfg.seed + 7)
    v = vlm_embeddings(ctx, ctx.vlm, d.ds["test"].images[idx],
                       f"{d.key}|test|{_digest(idx)}")
    return VLMTestOut(idx, first_n, v, t.take(idx))


CONSE_NOTE = ("ConSE-style (EfficientNet-Lite0 ImageNet probabilities mixed over MiniLM "
              "text embeddings); not CLIP")


def vlm_note(backend: str) -> str:
    """What metrics.json says the VLM is: ConSE's caveat, else the backend's own registered
    name (``open_clip``, or a backend another package registered)."""
    return CONSE_NOTE if backend == "conse" else backend


def fault_localisation_stage(ctx: Context, state: BuildState) -> dict:
    """metrics.json's ``vlm`` and ``fault_localisation`` sections."""
    cfg, vt, class_T = ctx.cfg, state.vlm_test, state.vlm.class_T
    a, t = state.aligner.aligner, vt.outs
    oracle = zero_shot_labels(vt.v, class_T)
    enc = encoder_view_labels(t.features, a.W, a.b, class_T)
    labels_sub, n = t.labels, vt.first_n
    out: dict = {"vlm": {
        "id": ctx.vlm.get().id,
        "backend": cfg.vlm.backend,
        "zero_shot_accuracy": round(float((oracle[:n] == labels_sub[:n]).mean()), 5),
        "zero_shot_n": n,
        "encoder_view_zero_shot_accuracy": round(float((enc[:n] == labels_sub[:n]).mean()),
                                                 5),
        "note": vlm_note(cfg.vlm.backend),
    }}
    faults = fault_report(labels_sub, t.predictions, oracle, enc,
                          t.concepts, state.heatmaps.model.ok, state.data.classes,
                          state.vlm.concept_set.names, cfg.evaluation.top_concepts)
    out["fault_localisation"] = {**faults.counts, "misclassified": int(len(faults.verdicts)),
                                 "pairs": faults.pairs[:15]}
    return out


def concept_check_stage(ctx: Context, state: BuildState) -> tuple[dict, dict]:
    """Where the VLM and aligner separate classes (the manifest's ``concept_competence``)
    and what the concepts named there are worth (metrics.json's ``concepts``)."""
    from conceptguard.repair import head_weights
    from offline.concept_check import concept_check

    r, c = state.served_outputs.outs["reference"], state.served_outputs.outs["calibration"]
    return concept_check(state.projection.o_ref, r.concepts, r.labels, c.features, c.labels,
                         head_weights(state.classifier.model), state.aligner.aligner.W,
                         state.vlm.T, state.data.classes, state.vlm.concept_set,
                         seed=ctx.cfg.seed)


def tensors_stage(ctx: Context, state: BuildState) -> dict[str, np.ndarray]:
    p, hm = state.projection, state.heatmaps
    tensors = bank_tensors(p.tensors, state.vlm.class_T, hm.model, hm.vlm,
                           state.calibration.monitor, ctx.cfg.heatmaps.delta, p.o_mu,
                           p.o_sigma)
    bankio.write_tensors(ctx.staging, tensors)
    return tensors


def fused_graph_stage(ctx: Context, state: BuildState) -> FusedGraphOut:
    """The monitor as the bank stores it (float32 tensors) in one graph with the model; or,
    when a registered detector has no fused form, or the written graph disagrees with numpy
    ``score()`` beyond float32's tolerance (a degenerate or extreme classifier), no graph:
    the bank is served from ``classifier.onnx`` with numpy scoring, the log and the manifest
    (``fused_graph``) say why."""
    c, path = state.classifier, ctx.staging / bankio.FUSED_ONNX
    stored = monitor_from_tensors(state.tensors, state.calibration.monitor.threshold)
    reason = fusable(stored)
    if reason is None:
        export_fused_onnx(MonitoredClassifier(c.model, state.projection.tensors), stored,
                          c.spec.input_shape, path)
        try:
            check_fused_graph(stored, path,
                              to_tensor(state.data.ds["test"].images[:64]).numpy())
            return FusedGraphOut(path)
        except GraphDisagrees as exc:  # float32 cannot carry this monitor's arithmetic
            path.unlink(missing_ok=True)
            reason = (f"the fused graph disagrees with numpy score() on test images "
                      f"({exc.problem})")
    log.warning("no fused graph: %s; the bank serves classifier.onnx with numpy scoring",
                reason)
    print(f"fused graph skipped: {reason} (served: classifier.onnx + numpy scoring)",
          file=sys.stderr, flush=True)
    return FusedGraphOut(None, reason)


def build_metrics(ctx: Context, state: BuildState) -> dict:
    return {**state.evaluation.metrics, **state.fault_localisation,
            "concepts": state.concept_check[1], "timings_s": dict(ctx.timings)}


def report_stage(ctx: Context, state: BuildState) -> bankio.Manifest:
    """The manifest (with the timings so far) and the report."""
    metrics = build_metrics(ctx, state)
    c, fitted = state.classifier, state.calibration
    manifest = make_manifest(ctx.cfg, metrics, state.vlm.concept_set, c.spec, c.hash,
                             state.data.splits, state.heatmaps.model, fitted.info,
                             fitted.monitor.threshold, state.data.classes,
                             state.vlm.T.shape[1], c.model.feature_dim,
                             state.data.sample_digest)
    manifest.concept_competence = state.concept_check[0]
    manifest.fused_graph = state.fused_graph.manifest_entry()
    write_report(ctx.staging / "report", manifest, state.tensors, metrics)
    return manifest


@dataclass(frozen=True)
class Stage:
    """A named step of the job: ``run(ctx, state)``'s output is stored as ``state.<name>``;
    its wall time is added to ``timings_s[timing or name]``."""

    name: str
    run: Callable[[Context, BuildState], Any]
    timing: str | None = None


BUILD_STAGES: tuple[Stage, ...] = (
    Stage("data", data_stage),
    Stage("classifier", classifier_stage),
    Stage("vlm", vlm_stage),
    Stage("aligner", aligner_stage),
    Stage("projection", projection_stage),
    Stage("export", export_stage),
    Stage("served_outputs", served_outputs_stage),
    Stage("adversarial", adversarial_stage),
    Stage("fitting_stream", fitting_stream_stage, timing="stream"),
    Stage("heatmaps", heatmaps_stage),
    Stage("calibration", calibration_stage),
    Stage("evaluation_sets", evaluation_sets_stage),
    Stage("evaluation", evaluation_stage),
    Stage("vlm_test", vlm_test_stage, timing="vlm"),
    Stage("fault_localisation", fault_localisation_stage),
    Stage("concept_check", concept_check_stage),
    Stage("tensors", tensors_stage),
    Stage("fused_graph", fused_graph_stage),
    Stage("report", report_stage),
)


def run_stages(ctx: Context, state: BuildState, stages: tuple[Stage, ...] = BUILD_STAGES
               ) -> BuildState:
    """The one runner: each stage timed (progress lines unless quiet), its output stored."""
    for st in stages:
        with ctx.stage(st.timing or st.name):
            setattr(state, st.name, st.run(ctx, state))
    return state


def build_bank(cfg: JobConfig, out: Path, *, progress: bool = True, use_cache: bool = True,
               engine: Engine | None = None) -> Path:
    """Run every stage and publish the bank folder at ``out`` (atomically). ``engine``:
    where the per-image stages run (default: this process). ``out`` must be absent, an
    empty folder or a bank (:func:`conceptguard.bank.replaceable`), checked before any work."""
    problem = bankio.replaceable(out)
    if problem is not None:
        raise bankio.BankError(problem)
    staging = staging_dir(out)
    try:
        _build(cfg, staging, progress=progress, use_cache=use_cache,
               engine=engine or LocalEngine())
        bankio.load_bank(staging)  # validate before publishing
        bankio.publish(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _build(cfg: JobConfig, staging: Path, *, progress: bool, use_cache: bool,
           engine: Engine) -> None:
    ctx = Context(cfg, ArrayCache(cfg.cache_dir, enabled=use_cache), progress, engine=engine,
                  staging=staging)
    single_threaded_blas()
    torch.manual_seed(cfg.seed)
    state = run_stages(ctx, BuildState())
    metrics = build_metrics(ctx, state)  # the final timings, the report's included
    manifest = state.report
    manifest.timings_s = dict(ctx.timings)
    bankio.atomic_write_text(staging / "report" / "metrics.json", json.dumps(metrics, indent=2))
    bankio.atomic_write_text(staging / "report" / SAMPLE_FILE, json.dumps(
        score_sample(state.evaluation.clean, state.data.splits.test, 64), indent=2))
    bankio.write_manifest(staging, manifest)
    if progress:
        print(f"bank built (cache: {len(ctx.cache.hits)} hits, {len(ctx.cache.misses)} "
              f"misses; engine: {engine.name})", flush=True)


SAMPLE_FILE = "test_scores_sample.json"


def score_sample(clean: Scores, test_indices: np.ndarray, n: int) -> dict:
    """The offline scores of the first ``n`` test inputs (indices into the dataset's test
    set), so that a client can check the service scores the same images identically."""
    n = min(n, len(test_indices))
    return {
        "test_indices": test_indices[:n].tolist(),
        "predictions": clean.predictions[:n].tolist(),
        "trust": clean.trust[:n].round(7).tolist(),
        **({"raw_trust": clean.raw_trust[:n].round(7).tolist()}
           if clean.raw_trust is not None else {}),
        "p_misclassification": clean.p_misclassification[:n].round(7).tolist(),
        "p_anomaly": clean.p_anomaly[:n].round(7).tolist(),
        "p_adversarial": clean.p_adversarial[:n].round(7).tolist(),
        "p_unfamiliar": clean.p_unfamiliar[:n].round(7).tolist(),
        "reject": clean.reject[:n].tolist(),
        "reason": clean.reason[:n],
    }


def check_onnx_matches(rt: OnnxRuntime, model, images: np.ndarray,
                       projection: dict[str, np.ndarray]) -> None:
    """The exported graph must reproduce the torch classifier and the float64 projection."""
    logits, feats = predict(model, images)
    o = rt.run(to_tensor(images).numpy())
    for name, got, want in (("logits", o.logits, logits), ("features", o.features, feats),
                            ("concepts", o.concepts, project_features(feats, projection))):
        err = float(np.abs(got - want).max())
        if err > 5e-3:
            raise RuntimeError(f"ONNX export disagrees with torch on {name}: max |diff| {err}")


def bank_tensors(projection: dict[str, np.ndarray], class_T: np.ndarray, hm_model: Heatmaps,
                 hm_vlm: Heatmaps, monitor, delta: float, o_mu: np.ndarray,
                 o_sigma: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {k: np.asarray(v, np.float32) for k, v in projection.items()}
    out["classes.T"] = class_T.astype(np.float32)
    out["projection.vlm_mu"] = o_mu.astype(np.float32)
    out["projection.vlm_sigma"] = o_sigma.astype(np.float32)
    out.update(hm_model.tensors("heatmaps.model"))
    out.update(hm_vlm.tensors("heatmaps.vlm"))
    out["heatmaps.model.diff_bin"] = binarise(hm_model.diff, delta)
    out["heatmaps.model.diff_adv_bin"] = binarise(hm_model.diff_adv, delta)
    out["heatmaps.vlm.diff_bin"] = binarise(hm_vlm.diff, delta)
    out.update(monitor_tensors(monitor))
    return out


THRESHOLD_SCALE = ("value: on the calibrated scale of the trust the service returns (reject "
                   "when trust < value); raw: the same threshold on the trust model's own "
                   "score, before the calibration map")


def make_manifest(cfg: JobConfig, metrics: dict, cs: ConceptSet, cspec, chash: str, splits,
                  hm: Heatmaps, calib_info: dict, threshold: float, classes: list[str],
                  vlm_dim: int, feature_dim: int, sample_digest: str) -> bankio.Manifest:
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return bankio.Manifest(
        schema_version=bankio.SCHEMA_VERSION,
        bank_id=f"{cfg.name}-{chash[:8]}-{created.strftime('%Y%m%dT%H%M%SZ')}",
        created_at=created.isoformat(),
        name=cfg.name,
        classes=classes,
        concept_set=cs.name,
        concepts=[bankio.ConceptEntry(name=c.name, prompts=c.phrasings) for c in cs.concepts],
        vlm={"spec": cfg.vlm.model_dump(), **{k: metrics["vlm"][k] for k in
                                              ("id", "zero_shot_accuracy", "note")}},
        classifier=bankio.ClassifierInfo(hash=chash, spec=cspec.model_dump(),
                                         feature_dim=feature_dim,
                                         test_accuracy=metrics["classifier"]["test_accuracy"]),
        preprocessing=bankio.Preprocessing(input_size=cspec.input_size,
                                           channels=cspec.in_channels),
        dims=bankio.Dims(classes=len(classes), concepts=len(cs.concepts),
                         features=feature_dim, vlm=int(vlm_dim)),
        data={"spec": json.loads(cfg.data.model_dump_json()), "splits": splits.summary(),
              "splits_digest": splits.digest(), "seed": cfg.seed,
              "sample_digest": sample_digest},  # what diagnose and inject-faults check
        attacks=[{"name": a.name, **a.model_dump()} for a in cfg.adversarial.attacks],
        heatmaps={"min_count": cfg.heatmaps.min_count, "delta": cfg.heatmaps.delta,
                  "split": "reference",
                  "fallback_bad": [classes[i] for i in np.flatnonzero(hm.fallback["bad"])],
                  "fallback_adv": [classes[i] for i in np.flatnonzero(hm.fallback["adv"])],
                  "fallback_rule": "pooled offset: H_ok[c] + mean over all classes' "
                                   "inputs of (s^ - H_ok[predicted])"},
        calibration={"spec": cfg.calibration.model_dump(), **calib_info,
                     "fit_attacks": [a.name for a in cfg.adversarial.fit_attacks],
                     "heatmap_attack": cfg.adversarial.heatmap_attack.name},
        threshold={"value": calib_info.get("threshold_calibrated", threshold),
                   "raw": threshold, "scale": THRESHOLD_SCALE,
                   "target": cfg.calibration.target, "target_value": cfg.calibration.value},
        signal_features=feature_names(),
        files={},
        evaluation={k: metrics[k] for k in ("classifier", "aligner", "threshold", "vlm")},
    )
