"""The offline job's per-image stages on Ray Data (local Ray, 2 CPUs) give the same tensors
as the single-process path that ``build-bank`` runs, from an image folder and from Parquet;
the file streams without Ray (offline.streaming) give them too."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import DEMO_BANK, REPO, encode_png
from tests.tolerance import assert_f32_close

pytestmark = pytest.mark.slow  # starts a local Ray

ray = pytest.importorskip("ray")

N = 60


@pytest.fixture(scope="module")
def fixture_set(fashion_mnist_test: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> dict[str, Any]:
    """60 test images as a class-per-folder image tree and as a Parquet file."""
    from offline.streaming import write_parquet

    root = tmp_path_factory.mktemp("ray-data")
    images = fashion_mnist_test.images[:N]
    labels = fashion_mnist_test.labels[:N].astype(np.int64)
    classes = [c.replace("/", "_") for c in fashion_mnist_test.classes]  # T-shirt/top
    folder = root / "images"
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        (folder / classes[y]).mkdir(parents=True, exist_ok=True)
        # names sort in dataset order within the folder tree: class folder, then index
        (folder / classes[y] / f"{i:05d}.png").write_bytes(encode_png(img))
    order = sorted(range(N), key=lambda i: (classes[labels[i]], i))  # the folder's row order
    parquet = write_parquet(root / "images.parquet", images, labels, rows_per_group=16)
    return {"images": images, "labels": labels, "classes": classes, "folder": folder,
            "folder_order": np.array(order), "parquet": parquet}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def single_process(fixture_set: dict[str, Any]) -> dict[str, np.ndarray]:
    """What the single-process build computes: offline.labelled_sets.served (the
    served-outputs stage), torch features as build_context.torch_features, and the
    monitor's scores."""
    from conceptguard.bank import load_bank
    from conceptguard.classifier.inference import predict
    from conceptguard.classifier.io import load_classifier
    from conceptguard.runtime import OnnxRuntime
    from conceptguard.scoring import score
    from offline.labelled_sets import served

    bank = load_bank(DEMO_BANK)
    rt = OnnxRuntime(bank.onnx_path, device="cpu")
    b = served(rt, fixture_set["images"], fixture_set["labels"])
    model, _, _ = load_classifier(DEMO_BANK / "classifier.safetensors")
    _, feats = predict(model, fixture_set["images"])
    s = score(bank.monitor, b.logits, b.features, b.concepts)
    return {"logits": b.logits, "features": b.features, "concepts": b.concepts,
            "torch_features": feats, "trust": s.trust, "prediction": s.predictions}


def test_served_and_scoring_from_an_image_folder(local_ray: None, fixture_set: dict[str, Any],
                                                 single_process: dict[str, np.ndarray]) -> None:
    from offline.ray_data import collect, read_source, run_stage

    ds = read_source(fixture_set["folder"], channels=1, classes=fixture_set["classes"])
    # 2 CPUs: two served actors + one scoring actor + a read task must fit at once
    ds = run_stage(ds, "served", workers=2, batch_size=16, num_cpus=0.25, bank=str(DEMO_BANK))
    ds = run_stage(ds, "scoring", workers=1, batch_size=32, num_cpus=0.25, bank=str(DEMO_BANK))
    got = collect(ds)
    order = fixture_set["folder_order"]  # row i of the folder is dataset image order[i]
    assert np.array_equal(got["id"], np.arange(N))
    assert np.array_equal(got["label"], fixture_set["labels"][order])
    for key in ("logits", "features", "concepts"):
        np.testing.assert_allclose(got[key], single_process[key][order], atol=1e-5, rtol=1e-5)
    assert_f32_close(got["trust"], single_process["trust"][order],
                     terms=got["features"].shape[1])
    assert np.array_equal(got["prediction"], single_process["prediction"][order])


def test_classifier_features_from_parquet(local_ray: None, fixture_set: dict[str, Any],
                                          single_process: dict[str, np.ndarray]) -> None:
    from offline.ray_data import collect, read_source, run_stage

    ds = read_source(fixture_set["parquet"], channels=1)
    ds = run_stage(ds, "classifier", workers=1, batch_size=32, num_cpus=0.5,
                   classifier=str(DEMO_BANK / "classifier.safetensors"))
    got = collect(ds)
    assert np.array_equal(got["id"], np.arange(N))
    assert np.array_equal(got["label"], fixture_set["labels"])
    np.testing.assert_allclose(got["features"], single_process["torch_features"], atol=1e-5,
                               rtol=1e-5)


def test_file_streams_without_ray(fixture_set: dict[str, Any],
                                  single_process: dict[str, np.ndarray]) -> None:
    from conceptguard.runtime import OnnxRuntime
    from offline.stages import served_outputs
    from offline.streaming import iter_source, run_streamed

    rt = OnnxRuntime(DEMO_BANK / "classifier.onnx", device="cpu")
    fn = partial(served_outputs, rt)
    from_parquet = run_streamed(fn, iter_source(fixture_set["parquet"], 1, batch_size=7))
    np.testing.assert_allclose(from_parquet["concepts"], single_process["concepts"], atol=1e-5)
    from_folder = run_streamed(fn, iter_source(fixture_set["folder"], 1, batch_size=7,
                                               classes=fixture_set["classes"]))
    order = fixture_set["folder_order"]
    np.testing.assert_allclose(from_folder["logits"], single_process["logits"][order],
                               atol=1e-5)
    assert np.array_equal(from_folder["label"], fixture_set["labels"][order])


def test_parquet_round_trip(tmp_path: Path) -> None:
    from offline.streaming import iter_parquet, write_parquet

    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = write_parquet(tmp_path / "x.parquet", images, np.arange(5), rows_per_group=2)
    batches = list(iter_parquet(path, channels=3, batch_size=2))
    assert [len(b["id"]) for b in batches] == [2, 2, 1]
    assert np.array_equal(np.concatenate([b["image"] for b in batches]), images)


def test_ray_engine_workers_read_the_image_files(local_ray: None,
                                                 fixture_set: dict[str, Any]) -> None:
    """build-bank's Ray engine on undecoded image-folder rows: the workers read and decode
    the files (the driver decodes none) and the served outputs equal the local engine's."""
    from conceptguard.data.image_folder import index_image_folder
    from offline.engine import LocalEngine, RayEngine

    _, test = index_image_folder(fixture_set["folder"], image_size=28, seed=0,
                                 test_fraction=0.5, channels=1)
    view = test.images.subset(np.arange(3, len(test)))  # a view: rows of a larger index
    onnx = str(DEMO_BANK / "classifier.onnx")
    got = RayEngine(workers=2).map("served", {"image": view, "label": test.labels[3:]},
                                   batch_size=8, onnx=onnx)
    assert test.images.decoded == 0  # nothing decoded in this process
    want = LocalEngine().map("served", {"image": view.load(), "label": test.labels[3:]},
                             batch_size=8, onnx=onnx)
    assert sorted(got) == sorted(want)
    for key in ("logits", "features", "concepts", "label"):
        np.testing.assert_array_equal(got[key], want[key])
