"""The streaming build: a folder source is an index decoded only for the rows asked for; the
test split's served outputs go to disk and are scored batch by batch, with the same results
as the in-memory path; and a build over a folder equals a build over the same images loaded
into memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from conceptguard.data import DataSpec, LazyDataset, open_source
from conceptguard.data.fashion_mnist import FASHION_MNIST_CLASSES
from conceptguard.data.image_folder import load_image_folder
from conceptguard.data.registry import LOADERS, register_source
from conceptguard.runtime import OnnxRuntime
from conceptguard.scoring import score
from offline.labelled_sets import served
from offline.streaming import oracle_indices, score_streamed, served_streamed
from tests.tolerance import assert_f32_close

pytestmark = pytest.mark.slow  # builds banks from a folder and from memory

FOLDERS = [f"{i}_{name.split('/')[0].lower().replace(' ', '_')}"
           for i, name in enumerate(FASHION_MNIST_CLASSES)]
N_TRAIN, N_TEST = 400, 300


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_test) -> Path:
    """``train/`` and ``test/`` of 28x28 grey PNGs, one folder per Fashion-MNIST class."""
    root = tmp_path_factory.mktemp("grey-folder")
    for i in range(N_TRAIN + N_TEST):
        split = "train" if i < N_TRAIN else "test"
        path = root / split / FOLDERS[int(fashion_mnist_test.labels[i])] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fashion_mnist_test.images[i, :, :, 0], mode="L").save(path)
    return root


def _spec(root: Path, source: str = "image_folder") -> DataSpec:
    return DataSpec(source=source, root=root, image_size=28, channels=1)


def test_folder_source_decodes_only_the_rows_asked_for(grey_folder: Path) -> None:
    train, test = open_source(_spec(grey_folder))
    assert isinstance(train, LazyDataset) and isinstance(test, LazyDataset)
    assert (len(train), len(test)) == (N_TRAIN, N_TEST)
    assert train.images.shape == (N_TRAIN, 28, 28, 1) and train.images.decoded == 0
    eager, _ = load_image_folder(grey_folder, image_size=28, channels=1)
    np.testing.assert_array_equal(train.labels, eager.labels)

    picked = train.subset(np.array([7, 3, 250, 11]))  # selecting rows decodes nothing
    assert train.images.decoded == 0
    np.testing.assert_array_equal(picked.images[[0, 2]], eager.images[[7, 250]])
    assert train.images.decoded == 2  # the counter is shared by every view of the source
    np.testing.assert_array_equal(picked.images[1:], eager.images[[3, 250, 11]])
    np.testing.assert_array_equal(train.images[-1], eager.images[-1])
    assert train.images.decoded == 6
    np.testing.assert_array_equal(picked.load().images, eager.images[[7, 3, 250, 11]])
    assert train.images.decoded == 10
    with pytest.raises(IndexError):
        train.images[[N_TRAIN]]


def test_streamed_test_outputs_and_scores_match_in_memory(grey_folder: Path, demo_bank,
                                                          tmp_path: Path) -> None:
    _, test = open_source(_spec(grey_folder))
    rt = OnnxRuntime(demo_bank.onnx_path, device="cpu")
    outs = served_streamed(rt, test, tmp_path, batch_size=64)
    assert test.images.decoded == N_TEST  # every row decoded once, 64 at a time
    images = test.load().images
    ref = served(rt, images, test.labels)
    np.testing.assert_array_equal(outs.predictions, ref.predictions)
    rows = np.array([299, 0, 150, 64, 63, 150])
    got = outs.take(rows)
    for name in ("logits", "features", "concepts"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name)[rows])
    np.testing.assert_array_equal(got.labels, test.labels[rows])

    streamed = score_streamed(demo_bank.monitor, outs, batch_size=128)
    whole = score(demo_bank.monitor, ref.logits, ref.features, ref.concepts)
    assert_f32_close(streamed.trust, whole.trust, terms=ref.features.shape[1])
    np.testing.assert_array_equal(streamed.reject, whole.reject)
    assert streamed.reason == whole.reason
    for name, risk in whole.risks.items():
        np.testing.assert_allclose(streamed.risks[name], risk, rtol=1e-5, atol=1e-6)
    assert streamed.probabilities.shape == (N_TEST, 0)  # per-image scalars only
    folder = outs.path.parent
    outs.close()
    assert not folder.exists()


def test_oracle_rows_cap_the_misclassified(demo_bank) -> None:
    from conceptguard.calibration import Batch

    labels = np.zeros(100, np.int64)
    logits = np.zeros((100, 10), np.float32)
    logits[np.arange(100), np.where(np.arange(100) % 3 == 0, 1, 0)] = 1.0  # every 3rd wrong
    b = Batch(logits, np.zeros((100, 4), np.float32), np.zeros((100, 2), np.float32), labels)
    rows, n_first = oracle_indices(b, 10, None, seed=0)
    assert n_first == 10
    assert rows.tolist() == list(range(10)) + [i for i in range(10, 100) if i % 3 == 0]
    capped, _ = oracle_indices(b, 10, 5, seed=0)
    assert capped[:10].tolist() == list(range(10)) and len(capped) == 15
    assert set(capped[10:].tolist()) <= set(rows[10:].tolist())
    assert np.all(np.diff(capped) > 0)


TINY = {
    "name": "tiny-folder",
    "splits": {"seed": 0, "fit": 120, "reference": 120, "calibration": 150, "test": None},
    "classifier": {"path": "banks/demo/classifier.safetensors"},  # tracked: the demo ResNet
    "vlm": {"backend": "conse", "image_size": 32, "top_k": 5},
    "class_prompts": list(FASHION_MNIST_CLASSES),
    "adversarial": {"attacks": [{"kind": "fgsm", "eps": 0.05, "steps": 1}],
                    "fit_attacks": [{"kind": "fgsm", "eps": 0.05, "steps": 1},
                                    {"kind": "pgd_l2", "eps": 1.0, "steps": 2}],
                    "heatmap_attack": {"kind": "fgsm", "eps": 0.05, "steps": 1},
                    "per_split": 40, "fit_per_attack": 30},
    "shifts": {"kinds": ["gaussian_noise", "contrast"], "fit_per_kind": 30,
               "test_per_kind": 40},
    "foreign": {"fit_sets": ["noise"], "test_sets": ["shapes"], "fit_per_set": 30,
                "test_per_set": 40},
    "calibration": {"folds": 2},
    "evaluation": {"vlm_test_images": 30, "vlm_misclassified_max": 10, "bootstrap": 20,
                   "mixed": {"clean": 60, "corruption": 20, "attack": 10, "foreign": 10}},
}


def test_build_over_a_folder_equals_the_build_over_the_images_in_memory(
        grey_folder: Path, tmp_path: Path) -> None:
    from offline.config import JobConfig
    from offline.pipeline import build_bank

    repo = Path(__file__).resolve().parents[1]
    register_source("image_folder_in_memory",
                    lambda spec: load_image_folder(spec.root, spec.image_size,
                                                   channels=spec.channels or 3))
    try:
        banks = {}
        for source in ("image_folder", "image_folder_in_memory"):
            cfg = JobConfig.model_validate(
                {**TINY, "data": _spec(grey_folder, source).model_dump(),
                 "classifier": {"path": str(repo / TINY["classifier"]["path"])},
                 "cache_dir": str(tmp_path / f"cache-{source}")})
            banks[source] = build_bank(cfg, tmp_path / source, progress=False)
    finally:
        LOADERS.pop("image_folder_in_memory", None)
    lazy, eager = (load_file(str(b / "tensors.safetensors")) for b in banks.values())
    assert lazy.keys() == eager.keys()
    for key in lazy:
        np.testing.assert_array_equal(lazy[key], eager[key], err_msg=key)
    m_lazy, m_eager = (json.loads((b / "report" / "metrics.json").read_text())
                       for b in banks.values())
    for m in (m_lazy, m_eager):
        m.pop("timings_s")
        m.pop("bank", None)
    assert m_lazy == m_eager
    assert m_lazy["classifier"]["n_test"] == N_TEST
    assert m_lazy["fault_localisation"]["misclassified"] <= 30 + 10  # capped
