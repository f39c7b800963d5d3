"""The ``conceptguard`` command: import-classifier, init, train-demo, build-bank,
export-graph, inject-faults, diagnose, check-concepts, report, serve."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_CONFIG = Path("configs/fashion-mnist-demo.yaml")


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError as exc:
        raise ValueError(f"expected numbers separated by commas, got {text!r}") from exc


def class_names(classes: str | None, classes_from: Path | None) -> list[str]:
    """``--classes a,b,c`` or the class sub-folders of an image folder (its ``train/`` when
    it has one), sorted as the image-folder source labels them."""
    from conceptguard.data.image_folder import list_classes

    if (classes is None) == (classes_from is None):
        raise ValueError("give the class names with --classes a,b,c or --classes-from FOLDER")
    if classes is not None:
        return [c.strip() for c in classes.split(",")]
    root = Path(classes_from)  # type: ignore[arg-type]
    if not root.is_dir():
        raise FileNotFoundError(f"--classes-from: {root} is not a folder")
    return list_classes(root / "train" if (root / "train").is_dir() else root)


def _import_classifier(args: argparse.Namespace) -> int:
    from conceptguard.classifier.importing import normalisation
    from offline.import_classifier import ImportRequest, import_classifier

    mean, std = normalisation(args.normalisation, _floats(args.mean), _floats(args.std),
                              args.channels)
    req = ImportRequest(out=args.out, classes=class_names(args.classes, args.classes_from),
                        input_size=args.input_size, channels=args.channels, mean=mean, std=std,
                        torchvision=args.torchvision, weights=args.weights, onnx=args.onnx,
                        features=args.features)
    summary = import_classifier(req)
    print(f"imported {summary['source']}: largest logit difference to the source "
          f"{summary['max_logit_difference']:.3g} (tolerance {summary['tolerance']:.3g})",
          file=sys.stderr)
    if not summary["gradients"]:
        print(f"warning: {summary['no_gradients_because']}; the encoder runs in ONNX Runtime "
              "without gradients, so build-bank will skip the attacks (and say so)",
              file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0


def _init(args: argparse.Namespace) -> int:
    from conceptguard.bank import atomic_write_text
    from offline.folder_config import folder_config

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to overwrite it")
    text, plan = folder_config(Path(args.data), Path(args.classifier), name=args.name,
                               concepts=args.concepts, config=str(out),
                               profile="quick" if args.quick else "full")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    print(plan, file=sys.stderr)
    print(f"{out} written; next: conceptguard build-bank --config {out} --out banks/NAME",
          file=sys.stderr)
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from conceptguard.classifier.inference import accuracy, predict
    from conceptguard.classifier.io import ClassifierSpec, build_classifier, save_classifier
    from conceptguard.classifier.train import train_classifier
    from conceptguard.data import load_source, make_splits
    from offline.config import load_config

    cfg = load_config(args.config)
    out = Path(args.out or cfg.classifier.path)
    train, test = load_source(cfg.data)
    splits = make_splits(len(train), len(test), cfg.splits)
    images, labels = train.images[splits.classifier_train], train.labels[splits.classifier_train]
    channels = images.shape[-1]
    pixels = images.reshape(-1, channels).astype(np.float64) / 255.0
    spec = ClassifierSpec(arch="small_resnet", num_classes=len(train.classes),
                          in_channels=channels, input_size=images.shape[1],
                          widths=cfg.train.widths, mean=pixels.mean(0).round(4).tolist(),
                          std=pixels.std(0).round(4).tolist(), classes=train.classes)
    model = build_classifier(spec)
    epochs = args.epochs or cfg.train.epochs
    kwargs = {"lr": cfg.train.lr} if cfg.train.lr else {}
    print(f"training {spec.arch} on {len(labels)} images "
          f"(the monitor's fit/reference/calibration splits are held out), {epochs} epochs",
          file=sys.stderr)
    stats = train_classifier(model, images, labels, epochs=epochs,
                             batch_size=cfg.train.batch_size, seed=cfg.seed, **kwargs)
    logits, _ = predict(model, test.images[splits.test], progress=False)
    acc = accuracy(logits, test.labels[splits.test])
    digest = save_classifier(model, spec, out)
    summary = {"path": str(out), "hash": digest, "test_accuracy": round(acc, 5),
               "train_seconds": round(stats.seconds, 1), "epochs": epochs,
               "train_images": len(labels)}
    print(json.dumps(summary, indent=2))
    return 0


def _job_config(args: argparse.Namespace):  # -> JobConfig
    """``--config``, or with ``--data`` and ``--classifier`` the config ``init`` writes."""
    from offline.config import JobConfig, load_config

    if args.data is None and args.classifier is None:
        if args.quick:
            raise ValueError("--quick applies to --data/--classifier builds (or `init --quick`)")
        return load_config(args.config or DEFAULT_CONFIG)
    if args.data is None or args.classifier is None or args.config is not None:
        raise ValueError("give --config, or --data FOLDER and --classifier FILE together "
                         "(the config `conceptguard init` would write)")
    import yaml

    from offline.folder_config import folder_config

    text, plan = folder_config(args.data, args.classifier,
                               profile="quick" if args.quick else "full")
    print(plan, file=sys.stderr)
    return JobConfig.model_validate(yaml.safe_load(text))


def _build_bank(args: argparse.Namespace) -> int:
    from offline.engine import make_engine
    from offline.pipeline import build_bank

    cfg = _job_config(args)
    if args.cache_dir:
        cfg.cache_dir = Path(args.cache_dir)
    from conceptguard.bank import replaceable

    problem = (_missing_offline_input(cfg.classifier.path, args.config,
                                      demo="train" in cfg.model_fields_set)
               or _classifier_mismatch(cfg) or replaceable(Path(args.out)))
    if problem:
        print(f"conceptguard build-bank: {problem}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    engine = make_engine(args.engine, workers=args.workers, address=args.ray_address)
    try:
        out = build_bank(cfg, Path(args.out), progress=not args.quiet,
                         use_cache=not args.no_cache, engine=engine)
    finally:
        engine.close()
    # the full report: curves and examples from the published bank, beside the figures
    # the build drew
    render_report(out, redraw=False)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    print(json.dumps(headline(metrics), indent=2))
    print(f"done in {time.perf_counter() - t0:.0f} s; report: {out / 'report' / 'index.html'}",
          file=sys.stderr)
    return 0


def _missing_offline_input(classifier: Path, config: Path, demo: bool = True) -> str | None:
    """Why build-bank cannot start (checked before any stage runs), or None. ``demo``: the
    config trains its classifier (it has a ``train`` section, as the demo's does), so
    ``train-demo`` is the way to make it; otherwise the user brings their own."""
    from conceptguard.attacks import MISSING_TORCHATTACKS, require_torchattacks

    if not classifier.is_file():
        where = "" if classifier.is_absolute() else \
            f" (a relative path resolves against the current folder, {Path.cwd()})"
        head = f"the classifier {classifier} (classifier.path in {config}) does not exist{where}"
        if demo:
            return (f"{head}: run `conceptguard train-demo --config {config}` first, or point "
                    "classifier.path at an existing classifier, e.g. "
                    "banks/demo/classifier.safetensors (the shipped demo bank's own)")
        return (f"{head}: run build-bank from the folder `conceptguard init` ran in, or point "
                "classifier.path at your classifier file (`conceptguard import-classifier` "
                "writes one from a torch or ONNX model)")
    try:
        require_torchattacks()
    except ModuleNotFoundError:
        return MISSING_TORCHATTACKS
    return None


def _classifier_mismatch(cfg) -> str | None:
    """The config against the classifier file's spec (its metadata only), or None."""
    from conceptguard.classifier.io import read_classifier_spec
    from offline.config import classifier_mismatch

    try:
        spec = read_classifier_spec(cfg.classifier.path)
    except ValueError:  # not a classifier file: the classifier stage says why
        return None
    why = classifier_mismatch(cfg, spec)
    return None if why is None else f"{why} (classifier {cfg.classifier.path})"


def headline(metrics: dict) -> dict:
    """The figures a person looks at first."""
    mis = metrics["misclassification"]
    return {
        "test_accuracy": metrics["classifier"]["test_accuracy"],
        "vlm_zero_shot_accuracy": metrics["vlm"]["zero_shot_accuracy"],
        "aligner_heldout_r2": metrics["aligner"]["heldout_r2"],
        "misclassification_auroc": {m: mis[m]["auroc"] for m in
                                    ("trust", "head_misclassification", "msp", "paper_rule")},
        "adversarial_auroc": {a: {m: s[m]["auroc"] for m in
                                  ("trust", "head_adversarial", "mahalanobis", "msp")}
                              for a, s in metrics["adversarial"].items()},
        "mixed_risk_at_90_coverage": {m: metrics["mixed"][m]["risk_at_90_coverage"]
                                      for m in ("trust", "msp", "mahalanobis")},
        "threshold": metrics["threshold"],
    }


def _inject_faults(args: argparse.Namespace) -> int:
    from offline.config import load_config
    from offline.inject_faults import inject_faults, summary_table

    cfg = load_config(args.config)
    if args.cache_dir:
        cfg.cache_dir = Path(args.cache_dir)
    seeds = tuple(range(args.seeds))
    out = inject_faults(cfg, Path(args.bank), kinds=args.kinds, seeds=seeds,
                        test_n=args.test_n, save_dir=args.save_variants,
                        progress=not args.quiet, write=not args.dry_run)
    print(summary_table(out))
    if not args.dry_run:
        print(f"written: {Path(args.bank) / 'report' / 'metrics.json'} (fault_injection) "
              f"in {out['info']['timings_s']['total']:.0f} s", file=sys.stderr)
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from offline.config import config_from_bank, load_config
    from offline.diagnose import DiagnoseOptions, diagnose

    cfg = load_config(args.config) if args.config else config_from_bank(Path(args.bank))
    if args.cache_dir:
        cfg.cache_dir = Path(args.cache_dir)
    if args.repair is not None and args.repair.suffix != ".safetensors":
        raise ValueError(f"--repair {args.repair}: the repaired classifier is written as "
                         "safetensors; name it *.safetensors")
    opts = DiagnoseOptions(classifier=args.classifier, repair_out=args.repair,
                           top_pairs=args.top_pairs, min_errors=args.min_errors,
                           test_limit=args.test_limit, paper_rule=not args.no_paper_rule,
                           progress=not args.quiet)
    result = diagnose(cfg, Path(args.bank), Path(args.out), opts)
    c = result["classifier"]
    print(json.dumps({"changed": c["changed"], "new_errors": c["new_errors"],
                      "fixed_by": c["fixed_by"], "fixed_errors": c["fixed_errors"],
                      "pairs": [{k: p[k] for k in ("true", "predicted", "errors", "changed",
                                                   "limit")} | {"repair_after":
                                                                p["repair"]["after"]}
                                for p in result["pairs"]],
                      "repair": {k: result["repair"][k] for k in
                                 ("accuracy_before", "accuracy_after", "limit_agreement")}},
                     indent=2))
    print(f"written: {Path(args.out) / 'diagnosis.json'}, diagnosis.html, diagnosis.png "
          f"({result['timings_s']['total']:.0f} s)", file=sys.stderr)
    return 0


def _check_concepts(args: argparse.Namespace) -> int:
    from offline.concept_check import check_concepts
    from offline.config import load_config

    cfg = load_config(args.config)
    if args.cache_dir:
        cfg.cache_dir = Path(args.cache_dir)
    t0 = time.perf_counter()
    out = check_concepts(cfg, Path(args.bank), threshold=args.threshold,
                         progress=not args.quiet)
    m = out["metrics"]
    print(json.dumps({k: m[k] for k in ("competent_pairs", "pairs", "competent_classes",
                                         "faithfulness_ratio", "plausibility",
                                         "plausibility_chance")}, indent=2))
    print(f"written: {Path(args.bank) / 'manifest.json'} (concept_competence) and "
          f"report/metrics.json (concepts) in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return 0


def render_report(bank_dir: Path, out: Path | None = None, *, evidence: bool = True,
                  attacks: bool = True, redraw: bool = True) -> list[Path]:
    """(Re-)render a bank's report from its metrics.json; with ``evidence``, also the curves
    and example thumbnails regenerated from the bank's own graph. ``redraw=False`` keeps
    the figures the build drew (``write_report``)."""
    import shutil

    from conceptguard.atomic import replace_folder, staging_dir
    from conceptguard.bank import load_bank
    from offline.report import write_report

    bank = load_bank(bank_dir)
    source = bank.path / "report" / "metrics.json"
    try:
        metrics = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{source} is not readable JSON: {exc}") from exc
    if not isinstance(metrics, dict):
        raise ValueError(f"{source} is not a JSON object")
    ev = None
    if evidence:
        from offline.report_evidence import compute_evidence
        # a bank built without attacks (no gradients) has no attack examples either
        ev = compute_evidence(bank, attacks=attacks and "attacks_skipped" not in metrics)
    # the real folder (a symlinked report folder keeps its link), never the working folder
    # or one holding it (it is swapped out whole)
    target = Path(out or bank.path / "report").resolve()
    if Path.cwd().resolve().is_relative_to(target):
        raise ValueError(f"{target} holds the current folder; give --out another folder")
    # rendered beside the target and swapped in: a failed rendering leaves it as it was
    staging = staging_dir(target, "render")
    try:
        if target.is_dir():
            shutil.copytree(target, staging, dirs_exist_ok=True)
        try:
            written = write_report(staging, bank.manifest, bank.tensors, metrics, ev,
                                   redraw=redraw)
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{source} lacks what the report needs ({exc!r}); re-run "
                             f"build-bank, or restore the file") from exc
        replace_folder(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return [target / p.relative_to(staging) for p in written]


def _report(args: argparse.Namespace) -> int:
    written = render_report(Path(args.bank), Path(args.out) if args.out else None,
                            evidence=not args.summary_only, attacks=not args.no_attacks)
    for p in written:
        print(p)
    return 0


def _export_graph(args: argparse.Namespace) -> int:
    from conceptguard.monitor_graph import add_fused_graph

    t0 = time.perf_counter()
    path = add_fused_graph(args.bank, opset=args.opset)
    print(f"{path} written and listed in the manifest ({time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.bank is not None:  # else CONCEPTGUARD_BANK, else the settings' default
        os.environ["CONCEPTGUARD_BANK"] = str(args.bank)
    if args.backend:
        os.environ["CONCEPTGUARD_BACKEND"] = args.backend
    os.environ["CONCEPTGUARD_LOG_LEVEL"] = args.log_level  # the service's own log lines too
    from service.protocol import PROTOCOLS
    from service.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"conceptguard serve: {exc}", file=sys.stderr)
        return 2
    if args.engine == "ray":
        return _serve_ray(args)
    made = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile
        made = tempfile.mkdtemp(prefix="conceptguard-prom-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    try:
        uvicorn.run("service.app:app", host=args.host, port=args.port, workers=args.workers,
                    log_level=args.log_level, http=PROTOCOLS[settings.http_parser],
                    access_log=settings.access_log,
                    timeout_keep_alive=settings.keep_alive_timeout_s,
                    timeout_graceful_shutdown=settings.drain_timeout_s)
    finally:
        if made is not None:  # nothing left behind in /tmp
            import shutil
            shutil.rmtree(made, ignore_errors=True)
    return 0


def _serve_ray(args: argparse.Namespace) -> int:
    """The same app as the ingress of a Ray Serve deployment (``service.ray_serve``): joins
    the cluster at ``--ray-address`` (or ``RAY_ADDRESS``), else starts a local Ray."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print("conceptguard serve --engine ray: Ray is not installed "
              "(pip install 'conceptguard[ray]')", file=sys.stderr)
        return 2
    from service.ray_serve import build

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=args.ray_num_cpus, include_dashboard=False)
    # Ctrl-C and SIGTERM only set a flag: the replica answers through Serve's proxy before
    # serve.run() returns, so a client may stop us while Ray's own code runs, where a
    # KeyboardInterrupt was lost and the process stayed up. Stopping happens below, once.
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build(), name="conceptguard", route_prefix="/", blocking=False)
        print(f"conceptguard on Ray Serve: http://{args.host}:{args.port} "
              "(ready at /v2/health/ready); Ctrl-C stops it", file=sys.stderr)
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # A local Ray started here goes down whole with ray.shutdown(): its processes, Serve's
        # controller and replicas included, in a few seconds. serve.shutdown() first would
        # drain every replica gracefully (tens of seconds on a loaded machine) for nothing.
        # On a cluster, only this app is deleted; the cluster and its other apps stay up.
        if address:
            serve.delete("conceptguard")
        ray.shutdown()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conceptguard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("import-classifier",
                       help="write the project's classifier file from a torchvision checkpoint "
                            "or an ONNX classifier (logits checked against the source)")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--torchvision", metavar="ARCH",
                     help="a torchvision classification model name, e.g. resnet18")
    src.add_argument("--onnx", type=Path, metavar="FILE", help="an ONNX classifier (NCHW input)")
    i.add_argument("--weights", type=Path, default=None,
                   help="with --torchvision: .safetensors, or a state dict torch.load reads "
                        "with weights_only=True")
    i.add_argument("--features", default=None, metavar="TENSOR",
                   help="with --onnx: the penultimate features tensor (default: the input of "
                        "the final Gemm/MatMul)")
    i.add_argument("--classes", default=None, help="class names in logit order: a,b,c")
    i.add_argument("--classes-from", type=Path, default=None, metavar="FOLDER",
                   help="class names from an image folder's sub-folders (sorted)")
    i.add_argument("--input-size", type=int, required=True, help="square input side, pixels")
    i.add_argument("--channels", type=int, choices=[1, 3], required=True)
    i.add_argument("--mean", default=None, help="per-channel mean of [0, 1] pixels: m1,m2,m3")
    i.add_argument("--std", default=None, help="per-channel std of [0, 1] pixels: s1,s2,s3")
    i.add_argument("--normalisation", choices=["imagenet", "none"], default=None,
                   help="a preset instead of --mean/--std (none: the model takes [0, 1])")
    i.add_argument("--out", type=Path, required=True, help="the classifier file to write")
    i.set_defaults(func=_import_classifier)

    n = sub.add_parser("init", help="write a commented build-bank config for an image folder "
                                    "and a classifier file")
    n.add_argument("--data", type=Path, required=True, help="the image folder")
    n.add_argument("--classifier", type=Path, required=True, help="the classifier file")
    n.add_argument("--out", type=Path, required=True, help="the config to write (YAML)")
    n.add_argument("--name", default=None, help="the bank's name (default: the folder's)")
    n.add_argument("--concepts", default="clothing",
                   help="a bundled concept set (clothing, rival10) or a YAML path")
    n.add_argument("--force", action="store_true", help="overwrite --out")
    n.add_argument("--quick", action="store_true",
                   help="the quick profile (as build-bank --quick)")
    n.set_defaults(func=_init)

    t = sub.add_parser("train-demo", help="train the demo ResNet on Fashion-MNIST")
    t.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    t.add_argument("--out", type=Path, default=None, help="default: the config's classifier.path")
    t.add_argument("--epochs", type=int, default=None)
    t.set_defaults(func=_train_demo)

    b = sub.add_parser("build-bank", help="run the offline job and write a bank folder")
    b.add_argument("--config", type=Path, default=None, help=f"default: {DEFAULT_CONFIG}")
    b.add_argument("--data", type=Path, default=None,
                   help="instead of --config: an image folder (with --classifier), sizes as "
                        "`conceptguard init` chooses them")
    b.add_argument("--classifier", type=Path, default=None,
                   help="with --data: the classifier file (import-classifier writes it)")
    b.add_argument("--quick", action="store_true",
                   help="with --data: a small bank (splits of at most 300, two attacks, three "
                        "corruptions, a short evaluation) to check a setup first")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--cache-dir", type=Path, default=None)
    b.add_argument("--no-cache", action="store_true", help="recompute every stage")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="where the per-image stages (classifier features, VLM embeddings, "
                        "attacks, served outputs, scoring) run: this process, or Ray Data "
                        "map_batches with the same stage functions (pip install "
                        "'conceptguard[ray]'); the rest runs in this process either way")
    b.add_argument("--workers", type=int, default=2,
                   help="with --engine ray: stage tasks at once (one CPU each; a local Ray "
                        "gets this many CPUs)")
    b.add_argument("--ray-address", default=None,
                   help="with --engine ray: a running cluster (default: RAY_ADDRESS, else a "
                        "local Ray)")
    b.set_defaults(func=_build_bank)

    f = sub.add_parser("inject-faults",
                       help="score diagnose (changed, limit vs. repair) and the paper's rule on "
                            "faults injected into variants of the bank's classifier")
    f.add_argument("--bank", type=Path, default=Path("banks/demo"))
    f.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    f.add_argument("--cache-dir", type=Path, default=None)
    f.add_argument("--save-variants", type=Path, default=None,
                   help="also save each variant classifier (safetensors) in this folder")
    f.add_argument("--kinds", nargs="+", default=None,
                   help="fault kinds (default: all eight; see offline/inject_faults.py)")
    f.add_argument("--seeds", type=_count(1), default=3, help="seeds per kind and severity")
    f.add_argument("--test-n", type=_count(1), default=None,
                   help="test-split inputs scored (default: evaluation.vlm_test_images)")
    f.add_argument("--dry-run", action="store_true", help="print, do not write metrics.json")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_inject_faults)

    d = sub.add_parser("diagnose",
                       help="what changed in a classifier against the bank's, what limits "
                            "each confused pair (head or encoder), and a head-only repair")
    d.add_argument("--bank", type=Path, required=True)
    d.add_argument("--classifier", type=Path, default=None,
                   help="the candidate (safetensors, the bank's classes and input shape); "
                        "default: the bank's own classifier")
    d.add_argument("--config", type=Path, default=None,
                   help="where the data comes from (the reference and test splits); "
                        "default: the data source and splits recorded in the bank")
    d.add_argument("--out", type=Path, required=True,
                   help="folder for diagnosis.json, diagnosis.html and diagnosis.png")
    d.add_argument("--repair", type=Path, default=None, metavar="OUT.safetensors",
                   help="also write the candidate with its head retrained (last-layer "
                        "retraining on reference features)")
    d.add_argument("--top-pairs", type=_count(1), default=8)
    d.add_argument("--min-errors", type=_count(1), default=5,
                   help="diagnose pairs with at least this many test errors")
    d.add_argument("--test-limit", type=_count(1), default=None,
                   help="only the first N test-split inputs (default: all)")
    d.add_argument("--no-paper-rule", action="store_true",
                   help="skip the paper's per-input rule (it embeds the errors with the VLM)")
    d.add_argument("--cache-dir", type=Path, default=None)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_diagnose)

    k = sub.add_parser("check-concepts",
                       help="measure where the VLM and aligner separate classes (concept "
                            "competence) and store it in an existing bank, no rebuild")
    k.add_argument("bank", type=Path)
    k.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="the config the bank was built with (data, splits, concept set)")
    k.add_argument("--threshold", type=_share, default=0.8,
                   help="probe accuracy both views must reach for a class or pair")
    k.add_argument("--cache-dir", type=Path, default=None)
    k.add_argument("--quiet", action="store_true")
    k.set_defaults(func=_check_concepts)

    g = sub.add_parser("export-graph",
                       help="add the fused graph (monitor.onnx: images -> every score) to a "
                            "bank built without it, and list its checksum in the manifest")
    g.add_argument("bank", type=Path)
    g.add_argument("--opset", type=_opset, default=17)
    g.set_defaults(func=_export_graph)

    r = sub.add_parser("report", help="re-render a bank's HTML report and PNG heatmaps")
    r.add_argument("bank", type=Path)
    r.add_argument("--out", type=Path, default=None, help="default: <bank>/report")
    r.add_argument("--summary-only", action="store_true",
                   help="only metrics.json's tables and heatmaps (no curves or thumbnails, "
                        "which re-score the test split with the bank's ONNX graph)")
    r.add_argument("--no-attacks", action="store_true",
                   help="skip the PGD examples (needs torch and the classifier)")
    r.set_defaults(func=_report)

    s = sub.add_parser("serve", help="start the HTTP service on a bank")
    s.add_argument("--bank", type=Path, default=None,
                   help="bank folder (default: CONCEPTGUARD_BANK, else banks/demo)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--backend", choices=["onnx", "torch"], default=None)
    s.add_argument("--log-level", default="info")
    s.add_argument("--engine", choices=["uvicorn", "ray"], default="uvicorn",
                   help="ray: the same app on Ray Serve (replicas and autoscaling from "
                        "CONCEPTGUARD_RAY_*; see service/ray_serve.py)")
    s.add_argument("--ray-address", default=None,
                   help="with --engine ray: a running cluster (default: RAY_ADDRESS, else a "
                        "local Ray)")
    s.add_argument("--ray-num-cpus", type=int, default=None,
                   help="with --engine ray and a local Ray: CPUs it may use")
    s.set_defaults(func=_serve)
    return p



def _count(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low`` (the message names the bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def _share(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return value


def _opset(text: str) -> int:
    """An argparse type: an ONNX opset the fused graph's operators exist in (13 to 20)."""
    value = _count(0)(text)
    if not 13 <= value <= 20:
        raise argparse.ArgumentTypeError(f"opset {value} is outside 13..20 (the fused "
                                         f"graph needs opset 13's reductions; 17 is the "
                                         f"default)")
    return value

def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, OSError, ModuleNotFoundError) as exc:
        print(f"conceptguard {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
