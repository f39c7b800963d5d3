"""build-bank: from a dataset and a classifier to a validated bank and its report.

Stages (each timed, cached where expensive): data, classifier features, VLM embeddings,
concept matrices, aligner, projection, adversarial, heatmaps, calibration, evaluation,
fault localisation, export (ONNX), fused graph (``monitor.onnx``), report. The math lives in
``conceptguard``; this module only orchestrates and does I/O.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from conceptguard import bank as bankio
from conceptguard.aligner import fit_aligner, mean_cosine, r2_score
from conceptguard.calibration import fit_monitor
from conceptguard.classifier.inference import predict, to_tensor
from conceptguard.classifier.io import load_classifier
from conceptguard.concepts import ConceptSet, class_matrix, concept_matrix, load_concept_set
from conceptguard.data import ArrayDataset, make_splits, open_source
from conceptguard.export import MonitoredClassifier, export_onnx
from conceptguard.faults import fault_report
from conceptguard.heatmaps import Heatmaps, binarise, build_heatmaps
from conceptguard.monitor_graph import check_fused_graph, export_fused_onnx
from conceptguard.monitor_io import monitor_from_tensors, monitor_tensors
from conceptguard.projection import aligned_embedding, project_features, raw_concept_scores
from conceptguard.runtime import OnnxRuntime
from conceptguard.scoring import Scores
from conceptguard.threads import single_threaded_blas
from conceptguard.trust import feature_names
from conceptguard.vlm import VLMBackend, create_vlm
from offline.cache import ArrayCache
from offline.config import JobConfig
from offline.evaluate import evaluate
from offline.progress import stage
from offline.report import write_report
from offline.stages import classifier_features, run_batched
from offline.stream import attacked, evaluation_sets, fitting_stream, served
from offline.streaming import oracle_indices, score_streamed, served_streamed, split_datasets


class LazyVLM:
    """Builds the VLM only when a cache miss needs it (loading takes seconds)."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self._vlm: VLMBackend | None = None

    def get(self) -> VLMBackend:
        if self._vlm is None:
            self._vlm = create_vlm(self.cfg.vlm)
        return self._vlm

    @property
    def id(self) -> str:
        return self.cfg.vlm.model_dump_json()


@dataclass
class Context:
    cfg: JobConfig
    cache: ArrayCache
    progress: bool
    timings: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str):
        return stage(name, self.timings, quiet=not self.progress)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def _concept_set_digest(cs: ConceptSet) -> str:
    return hashlib.sha256(cs.model_dump_json().encode()).hexdigest()[:20]


def torch_features(ctx: Context, model, chash: str, ds: ArrayDataset, split: str,
                   data_key: str) -> np.ndarray:
    """Penultimate features from the torch classifier (fit and reference splits: the
    aligner and the standardisation are fitted on them before the graph is exported)."""
    return ctx.cache.get_or_compute(
        "classifier", {"hash": chash, "data": data_key, "split": split},
        lambda: {"features": run_batched(partial(classifier_features, model),
                                         ds.images)["features"]})["features"]


def vlm_embeddings(ctx: Context, vlm: LazyVLM, images: np.ndarray, key: str) -> np.ndarray:
    return ctx.cache.get_or_compute(
        "vlm-images", {"vlm": vlm.id, "images": key},
        lambda: {"v": vlm.get().encode_images(images, progress=ctx.progress)})["v"]


def build_bank(cfg: JobConfig, out: Path, *, progress: bool = True, use_cache: bool = True
               ) -> Path:
    """Run every stage and publish the bank folder at ``out`` (atomically)."""
    staging = bankio.staging_dir(out)
    try:
        _build(cfg, staging, progress=progress, use_cache=use_cache)
        bankio.load_bank(staging)  # validate before publishing
        bankio.publish(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _build(cfg: JobConfig, staging: Path, *, progress: bool, use_cache: bool) -> None:
    ctx = Context(cfg, ArrayCache(cfg.cache_dir, enabled=use_cache), progress)
    single_threaded_blas()
    seed = cfg.seed
    torch.manual_seed(seed)

    with ctx.stage("data"):
        train, test = open_source(cfg.data)  # a folder source: an index, decoded on demand
        splits = make_splits(len(train), len(test), cfg.splits)
        ds = split_datasets(train, test, splits)  # test stays lazy: streamed below
        data_key = f"{cfg.data.model_dump_json()}|{splits.digest()}"
        classes = train.classes

    with ctx.stage("classifier"):
        model, cspec, chash = load_classifier(cfg.classifier.path)
        if cspec.num_classes != len(classes):
            raise ValueError(f"classifier has {cspec.num_classes} classes, the dataset "
                             f"{len(classes)}")
        z_fit = torch_features(ctx, model, chash, ds["fit"], "fit", data_key)
        z_ref = torch_features(ctx, model, chash, ds["reference"], "reference", data_key)

    vlm = LazyVLM(cfg)
    cs = load_concept_set(cfg.concepts)
    concept_names = cs.names
    class_prompt_names = cfg.class_prompts or classes
    with ctx.stage("vlm"):
        texts = ctx.cache.get_or_compute(
            "vlm-texts", {"vlm": vlm.id, "concepts": _concept_set_digest(cs),
                          "classes": class_prompt_names},
            lambda: {"T": concept_matrix(vlm.get(), cs),
                     "C": class_matrix(vlm.get(), class_prompt_names, cs.class_templates,
                                       cs.class_aliases)})
        T, class_T = texts["T"], texts["C"]
        v_fit = vlm_embeddings(ctx, vlm, ds["fit"].images, data_key + "|fit")
        v_ref = vlm_embeddings(ctx, vlm, ds["reference"].images, data_key + "|reference")

    with ctx.stage("aligner"):
        aligner = fit_aligner(z_fit, v_fit, seed=seed)
        pred_ref = aligner.transform(z_ref)
        aligner_info = {"heldout_r2": round(r2_score(pred_ref, v_ref), 5),
                        "heldout_cosine": round(mean_cosine(pred_ref, v_ref), 5),
                        "lambda": aligner.lam, "fit_n": len(v_fit), "heldout_n": len(v_ref),
                        "heldout_split": "reference"}

    with ctx.stage("projection"):
        raw_ref = raw_concept_scores(z_ref.astype(np.float64), aligner.W.astype(np.float64),
                                     aligner.b.astype(np.float64), T.astype(np.float64))
        mu, sigma = raw_ref.mean(0), np.maximum(raw_ref.std(0), 1e-6)
        projection = {"aligner.W": aligner.W, "aligner.b": aligner.b, "concepts.T": T,
                      "projection.mu": mu.astype(np.float32),
                      "projection.sigma": sigma.astype(np.float32)}
        o_ref_raw = v_ref @ T.T
        o_mu, o_sigma = o_ref_raw.mean(0), np.maximum(o_ref_raw.std(0), 1e-6)
        o_ref = (o_ref_raw - o_mu) / o_sigma

    with ctx.stage("export"):
        shutil.copyfile(cfg.classifier.path, staging / bankio.CLASSIFIER)
        export_onnx(MonitoredClassifier(model, projection), cspec.input_shape,
                    staging / bankio.ONNX)
        rt = OnnxRuntime(staging / bankio.ONNX, device="cpu")
        check_onnx_matches(rt, model, ds["test"].images[:64], projection)

    with ctx.stage("served_outputs"):
        outs = {name: served(rt, ds[name].images, ds[name].labels)
                for name in ("reference", "calibration")}
        outs["test"] = served_streamed(rt, ds["test"], cfg.cache_dir / "tmp")  # on disk
        test_accuracy = float((outs["test"].predictions == outs["test"].labels).mean())

    with ctx.stage("adversarial"):
        akey = {"hash": chash, "data": data_key}
        hm_attack = cfg.adversarial.heatmap_attack
        adv_ref, _ = attacked(ctx, rt, model, {**akey, "split": "reference"},
                              ds["reference"], outs["reference"], hm_attack,
                              cfg.adversarial.per_split, seed + 1)
        adv_ref = adv_ref.select(adv_ref.wrong)

    with ctx.stage("stream"):
        stream = fitting_stream(ctx, cfg, rt, model, akey, ds["calibration"], outs["calibration"],
                                seed)

    with ctx.stage("heatmaps"):
        r = outs["reference"]
        hm_model = build_heatmaps(r.concepts, r.labels, r.predictions, len(classes),
                                  adv_scores=adv_ref.concepts,
                                  adv_predictions=adv_ref.predictions,
                                  min_count=cfg.heatmaps.min_count)
        hm_vlm = build_heatmaps(o_ref, r.labels, r.predictions, len(classes),
                                min_count=cfg.heatmaps.min_count)

    with ctx.stage("calibration"):
        fitted = fit_monitor(outs["reference"], hm_model, stream, cfg.calibration, seed)
        monitor, calib_info = fitted.monitor, fitted.info

    with ctx.stage("evaluation_sets"):
        t = outs["test"]
        sets, attempted = evaluation_sets(ctx, cfg, rt, model, akey, ds["test"], t, seed)

    with ctx.stage("evaluation"):
        clean = score_streamed(monitor, t)  # batch by batch; per-image scalars kept
        metrics: dict = {
            "bank": cfg.name,
            "classifier": {"test_accuracy": round(test_accuracy, 5), "hash": chash,
                           "n_test": len(t)},
            "aligner": aligner_info,
            **evaluate(cfg, fitted, stream, clean, t.labels, sets, attempted, seed),
            "calibration": calib_info,
        }
    with ctx.stage("vlm"):  # the oracle on test images: zero-shot accuracy and faults
        vlm_test_idx, first_n = oracle_indices(t, cfg.evaluation.vlm_test_images,
                                               cfg.evaluation.vlm_misclassified_max, seed + 7)
        t_sub = t.take(vlm_test_idx)
        v_test = vlm_embeddings(ctx, vlm, ds["test"].images[vlm_test_idx],
                                data_key + "|test|" + _digest(vlm_test_idx))

    with ctx.stage("fault_localisation"):
        oracle = (v_test @ class_T.T).argmax(1)
        enc = (aligned_embedding(t_sub.features, aligner.W, aligner.b) @ class_T.T).argmax(1)
        labels_sub = t_sub.labels
        metrics["vlm"] = {
            "id": vlm.get().id,
            "backend": cfg.vlm.backend,
            "zero_shot_accuracy": round(float((oracle[:first_n] == labels_sub[:first_n])
                                              .mean()), 5),
            "zero_shot_n": first_n,
            "encoder_view_zero_shot_accuracy": round(float(
                (enc[:first_n] == labels_sub[:first_n]).mean()), 5),
            "note": ("ConSE-style (EfficientNet-Lite0 ImageNet probabilities mixed over "
                     "MiniLM text embeddings); not CLIP" if cfg.vlm.backend == "conse"
                     else "open_clip"),
        }
        faults = fault_report(labels_sub, t_sub.predictions, oracle, enc,
                              t_sub.concepts, hm_model.ok, classes, concept_names,
                              cfg.evaluation.top_concepts)
        metrics["fault_localisation"] = {**faults.counts,
                                         "misclassified": int(len(faults.verdicts)),
                                         "pairs": faults.pairs[:15]}

    tensors = bank_tensors(projection, class_T, hm_model, hm_vlm, monitor,
                           cfg.heatmaps.delta, o_mu, o_sigma)
    bankio.write_tensors(staging, tensors)
    with ctx.stage("fused_graph"):  # the monitor as the bank stores it (float32 tensors)
        stored = monitor_from_tensors(tensors, monitor.threshold)
        export_fused_onnx(MonitoredClassifier(model, projection), stored, cspec.input_shape,
                          staging / bankio.FUSED_ONNX)
        check_fused_graph(stored, staging / bankio.FUSED_ONNX,
                          to_tensor(ds["test"].images[:64]).numpy())
    metrics["timings_s"] = dict(ctx.timings)
    manifest = make_manifest(cfg, metrics, cs, cspec, chash, splits, hm_model, calib_info,
                             monitor.threshold, classes, T.shape[1], model.feature_dim)
    with ctx.stage("report"):
        write_report(staging / "report", manifest, tensors, metrics)
    metrics["timings_s"] = dict(ctx.timings)
    manifest.timings_s = dict(ctx.timings)
    bankio.atomic_write_text(staging / "report" / "metrics.json", json.dumps(metrics, indent=2))
    bankio.atomic_write_text(staging / "report" / SAMPLE_FILE,
                             json.dumps(score_sample(clean, splits.test, 64), indent=2))
    bankio.write_manifest(staging, manifest)
    if progress:
        print(f"bank built (cache: {len(ctx.cache.hits)} hits, {len(ctx.cache.misses)} "
              "misses)", flush=True)


SAMPLE_FILE = "test_scores_sample.json"


def score_sample(clean: Scores, test_indices: np.ndarray, n: int) -> dict:
    """The offline scores of the first ``n`` test inputs (indices into the dataset's test
    set), so that a client can check the service scores the same images identically."""
    n = min(n, len(test_indices))
    return {
        "test_indices": test_indices[:n].tolist(),
        "predictions": clean.predictions[:n].tolist(),
        "trust": clean.trust[:n].round(7).tolist(),
        "p_misclassification": clean.p_misclassification[:n].round(7).tolist(),
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


def make_manifest(cfg: JobConfig, metrics: dict, cs: ConceptSet, cspec, chash: str, splits,
                  hm: Heatmaps, calib_info: dict, threshold: float, classes: list[str],
                  vlm_dim: int, feature_dim: int) -> bankio.Manifest:
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
              "splits_digest": splits.digest(), "seed": cfg.seed},
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
        threshold={"value": threshold, "target": cfg.calibration.target,
                   "target_value": cfg.calibration.value},
        signal_features=feature_names(),
        files={},
        evaluation={k: metrics[k] for k in ("classifier", "aligner", "threshold", "vlm")},
    )
