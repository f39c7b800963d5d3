"""Data sources on real files generated in tmp_path (plus the real Debian Fashion-MNIST)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from conceptguard.data import ArrayDataset, DataSpec, load_source
from conceptguard.data.cifar10 import RECORD_BYTES, load_cifar10, read_batch
from conceptguard.data.fashion_mnist import (
    DEFAULT_ROOT,
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
)
from conceptguard.data.idx import parse_idx, read_idx
from conceptguard.data.image_folder import load_image_folder
from conceptguard.data.rival10 import RIVAL10_ATTRIBUTES, RIVAL10_CLASSES, load_rival10
from tests.fixtures_data import (
    idx_bytes,
    make_cifar10,
    make_fashion_mnist,
    make_image_folder,
    make_rival10,
    write_attributes,
    write_idx,
    write_png,
)

# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, compress: bool, dtype: type) -> None:
    array = (np.arange(24) * 7 % 100 - 30).reshape(2, 3, 4)
    array = array.astype(dtype) if np.dtype(dtype).kind != "u" else (array + 30).astype(dtype)
    path = write_idx(tmp_path / "a.idx", array, compress)
    out = read_idx(path)
    assert out.shape == (2, 3, 4)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)


def test_idx_bad_magic_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad-images.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + b"\x00" * 8))
    with pytest.raises(ValueError, match=r"bad-images\.gz.*bad magic"):
        read_idx(path)


def test_idx_unsupported_dtype(tmp_path: Path) -> None:
    path = tmp_path / "odd.idx"
    path.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match=r"odd\.idx.*dtype code 0x07"):
        read_idx(path)


def test_idx_truncated_data_names_file(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8))
    path = tmp_path / "short-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(ValueError, match=r"short-images-idx3-ubyte\.gz.*truncated"):
        read_idx(path)


def test_idx_truncated_header_and_trailing_bytes() -> None:
    with pytest.raises(ValueError, match=r"mem.*truncated IDX header"):
        parse_idx(b"\x00\x00\x08\x03\x00\x00", name="mem")
    data = idx_bytes(np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="trailing"):
        parse_idx(data + b"\x00", name="mem")


def test_idx_truncated_gzip_stream_names_file(tmp_path: Path) -> None:
    blob = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz.*gzip"):
        read_idx(path)


# ---------------------------------------------------------------- Fashion-MNIST


def _assert_fashion(ds: ArrayDataset, images: np.ndarray, labels: np.ndarray) -> None:
    assert ds.images.shape == (len(images), 28, 28, 1)
    assert ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64
    assert ds.classes == FASHION_MNIST_CLASSES
    np.testing.assert_array_equal(ds.images[..., 0], images)
    np.testing.assert_array_equal(ds.labels, labels)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_fixture(tmp_path: Path, compress: bool) -> None:
    expected = make_fashion_mnist(tmp_path, n_train=20, n_test=10, compress=compress)
    train, test = load_fashion_mnist(tmp_path, download=False)
    _assert_fashion(train, *expected["train"])
    _assert_fashion(test, *expected["test"])
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"


def test_fashion_mnist_torchvision_raw_layout_via_registry(tmp_path: Path) -> None:
    expected = make_fashion_mnist(tmp_path / "FashionMNIST" / "raw", n_train=12, n_test=6)
    train, test = load_source(DataSpec(source="fashion_mnist", root=tmp_path))
    _assert_fashion(train, *expected["train"])
    _assert_fashion(test, *expected["test"])


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, download=False)


def test_fashion_mnist_corrupt_file_names_it(tmp_path: Path) -> None:
    make_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"garbage!"))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_label_count_mismatch(tmp_path: Path) -> None:
    make_fashion_mnist(tmp_path, n_train=20)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels for 20 images"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_debian_package() -> None:
    train, test = load_source(DataSpec(source="fashion_mnist"))
    assert train.images.shape == (60000, 28, 28, 1)
    assert test.images.shape == (10000, 28, 28, 1)
    assert train.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), [1000] * 10)
    assert 0 < train.images.mean() < 255


# ---------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_fixture(tmp_path: Path, nested: bool) -> None:
    names = [f"class{i}" for i in range(10)]  # read from batches.meta.txt, not the defaults
    expected = make_cifar10(tmp_path, per_batch=3, n_test=4, classes=names)
    root = tmp_path if nested else tmp_path / "cifar-10-batches-bin"
    train, test = load_cifar10(root)
    assert train.images.shape == (15, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert train.classes == names
    for ds, split in ((train, "train"), (test, "test")):
        np.testing.assert_array_equal(ds.images, expected[split][0])
        np.testing.assert_array_equal(ds.labels, expected[split][1])


def test_cifar10_record_is_label_then_chw(tmp_path: Path) -> None:
    planes = np.stack([np.full((32, 32), v, dtype=np.uint8) for v in (10, 20, 30)])
    planes[0, 0, 1] = 200  # red, row 0, column 1
    path = tmp_path / "one.bin"
    path.write_bytes(bytes([3]) + planes.tobytes())
    images, labels = read_batch(path)
    assert labels.tolist() == [3]
    assert images.shape == (1, 32, 32, 3)
    assert images[0, 0, 0].tolist() == [10, 20, 30]
    assert images[0, 0, 1].tolist() == [200, 20, 30]


def test_cifar10_truncated_batch_names_file(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[: RECORD_BYTES + 7])
    with pytest.raises(ValueError, match=r"data_batch_3\.bin.*truncated"):
        load_cifar10(tmp_path)


def test_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-binary"):
        load_source(DataSpec(source="cifar10", root=tmp_path))


# ---------------------------------------------------------------- ImageFolder


def test_image_folder_split_layout(tmp_path: Path) -> None:
    expected = make_image_folder(tmp_path, ["zebra", "apple", "mango"], per_class=3, size=16)
    train, test = load_source(DataSpec(source="image_folder", root=tmp_path, image_size=16))
    assert train.classes == ["apple", "mango", "zebra"]
    assert train.images.shape == (9, 16, 16, 3) and test.images.shape == (9, 16, 16, 3)
    assert train.images.dtype == np.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    keys = [f"{c}/img_{i:02d}.png" for c in ("apple", "mango", "zebra") for i in range(3)]
    np.testing.assert_array_equal(train.images, np.stack([expected["train"][k] for k in keys]))
    np.testing.assert_array_equal(test.images, np.stack([expected["test"][k] for k in keys]))


def test_image_folder_resizes_and_defaults_to_64(tmp_path: Path) -> None:
    make_image_folder(tmp_path, ["a", "b"], per_class=1, size=20)
    train, _ = load_image_folder(tmp_path)
    assert train.images.shape == (2, 64, 64, 3)
    small, _ = load_image_folder(tmp_path, image_size=8)
    assert small.images.shape == (2, 8, 8, 3)


def test_image_folder_grayscale_becomes_rgb(tmp_path: Path) -> None:
    for split in ("train", "test"):
        path = tmp_path / split / "only" / "g.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 77, dtype=np.uint8), mode="L").save(path)
    train, _ = load_image_folder(tmp_path, image_size=8)
    assert train.images.shape == (1, 8, 8, 3)
    assert (train.images == 77).all()


def test_image_folder_flat_layout_seeded_split(tmp_path: Path) -> None:
    make_image_folder(tmp_path, ["b", "a", "c"], per_class=5, size=8, split=False)
    train, test = load_image_folder(tmp_path, image_size=8, seed=0)
    assert train.classes == ["a", "b", "c"]
    assert np.bincount(train.labels).tolist() == [4, 4, 4]
    assert np.bincount(test.labels).tolist() == [1, 1, 1]
    again_train, again_test = load_image_folder(tmp_path, image_size=8, seed=0)
    np.testing.assert_array_equal(again_test.images, test.images)
    np.testing.assert_array_equal(again_train.images, train.images)
    _, other = load_source(DataSpec(source="image_folder", root=tmp_path, image_size=8,
                                    holdout_seed=3))
    assert not np.array_equal(other.images, test.images)
    # every image lands in exactly one side
    all_rows = {img.tobytes() for img in np.concatenate([train.images, test.images])}
    assert len(all_rows) == 15


def test_image_folder_unreadable_image_names_file(tmp_path: Path) -> None:
    make_image_folder(tmp_path, ["a", "b"], per_class=2, size=8)
    (tmp_path / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load_image_folder(tmp_path, image_size=8)


def test_image_folder_missing_root_and_no_root(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist") as absolute:
        load_source(DataSpec(source="image_folder", root=tmp_path / "nope"))
    assert "current folder" not in str(absolute.value)
    monkeypatch.chdir(tmp_path)  # a relative root: the message says what it resolves against
    with pytest.raises(FileNotFoundError, match=f"current folder, {tmp_path}"):
        load_source(DataSpec(source="image_folder", root=Path("nope")))
    with pytest.raises(ValueError, match=r"needs data\.root"):
        load_source(DataSpec(source="image_folder"))


def test_image_folder_test_class_not_in_train(tmp_path: Path) -> None:
    make_image_folder(tmp_path, ["a"], per_class=1, size=8)
    write_png(tmp_path / "test" / "zzz" / "x.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="zzz"):
        load_image_folder(tmp_path, image_size=8)


# ---------------------------------------------------------------- RIVAL10


def test_rival10_constants() -> None:
    assert len(RIVAL10_CLASSES) == 10 and len(RIVAL10_ATTRIBUTES) == 18
    assert RIVAL10_CLASSES[0] == "truck" and RIVAL10_ATTRIBUTES[-1] == "patterned"


@pytest.mark.parametrize("as_dict", [False, True])
def test_rival10_fixture(tmp_path: Path, as_dict: bool) -> None:
    classes = ["bird", "truck", "cat"]
    expected = make_rival10(tmp_path, classes, per_class=2, size=16, as_dict=as_dict)
    train, test = load_source(DataSpec(source="rival10", root=tmp_path, image_size=16))
    for ds, split in ((train, "train"), (test, "test")):
        assert ds.classes == RIVAL10_CLASSES
        assert ds.attribute_names == RIVAL10_ATTRIBUTES
        assert ds.images.shape == (6, 16, 16, 3) and ds.images.dtype == np.uint8
        assert ds.attributes is not None
        assert ds.attributes.shape == (6, 18) and ds.attributes.dtype == np.uint8
        # class order is RIVAL10's: truck (0), cat (4), bird (9)
        assert ds.labels.tolist() == [0, 0, 4, 4, 9, 9]
        keys = [f"{c}/{split}_{i:02d}.png" for c in ("truck", "cat", "bird") for i in range(2)]
        np.testing.assert_array_equal(ds.images, np.stack([expected[split][k][0] for k in keys]))
        for row, key in zip(ds.attributes, keys, strict=True):
            present = {RIVAL10_ATTRIBUTES[j] for j in np.flatnonzero(row)}
            assert present == set(expected[split][key][1])
    sub = train.subset(np.array([1, 4]))
    assert sub.attributes is not None and sub.attributes.shape == (2, 18)


def test_rival10_jpeg_suffix_and_resize(tmp_path: Path) -> None:
    for split in ("train", "test"):
        path = tmp_path / split / "frog" / "n01.JPEG"
        path.parent.mkdir(parents=True)
        Image.fromarray(np.full((40, 30, 3), 120, dtype=np.uint8)).save(path, format="JPEG")
        (tmp_path / split / "frog" / "readme.md").write_text("skip me")
        write_attributes(tmp_path / split / "attributes.json", {"frog/n01.JPEG": ["wet"]},
                         ["wet"])
    train, _ = load_rival10(tmp_path)
    assert train.images.shape == (1, 64, 64, 3)
    assert abs(int(train.images.mean()) - 120) <= 3
    assert train.labels.tolist() == [RIVAL10_CLASSES.index("frog")]
    assert train.attributes is not None
    assert train.attributes[0].tolist() == [int(a == "wet") for a in RIVAL10_ATTRIBUTES]


def test_rival10_missing_attribute_entry(tmp_path: Path) -> None:
    make_rival10(tmp_path, ["cat"], per_class=2, size=8)
    path = tmp_path / "train" / "attributes.json"
    table = json.loads(path.read_text())
    del table["cat/train_01.png"]
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=r"cat/train_01\.png"):
        load_rival10(tmp_path, image_size=8)


def test_rival10_bad_attribute_and_class(tmp_path: Path) -> None:
    make_rival10(tmp_path, ["dog"], per_class=1, size=8)
    write_attributes(tmp_path / "test" / "attributes.json", {"dog/test_00.png": ["fins"]},
                     ["fins"])
    with pytest.raises(ValueError, match="unknown attribute 'fins'"):
        load_rival10(tmp_path, image_size=8)
    write_attributes(tmp_path / "test" / "attributes.json", {"dog/test_00.png": []}, [])
    (tmp_path / "train" / "horse").mkdir()
    with pytest.raises(ValueError, match="unknown RIVAL10 class folders"):
        load_rival10(tmp_path, image_size=8)


def test_rival10_missing_split(tmp_path: Path) -> None:
    make_rival10(tmp_path, ["ship"], per_class=1, size=8)
    (tmp_path / "test" / "attributes.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"attributes\.json"):
        load_rival10(tmp_path, image_size=8)


# ---------------------------------------------------------------- registry and spec


def test_registry_unknown_source() -> None:
    with pytest.raises(ValidationError, match="unknown data source 'mnist'"):
        DataSpec(source="mnist")


def test_a_registered_source_is_valid_and_loads() -> None:
    """A new backend needs only ``register_source``: the spec validates against the registry."""
    from conceptguard.data import registry

    images = np.zeros((4, 8, 8, 1), np.uint8)
    ds = ArrayDataset("tiny", images, np.array([0, 1, 0, 1]), ["a", "b"])
    registry.register_source("tiny_test_source", lambda spec: (ds, ds))
    try:
        with pytest.raises(ValueError, match="already registered"):
            registry.register_source("tiny_test_source", lambda spec: (ds, ds))
        spec = DataSpec(source="tiny_test_source")
        train, test = load_source(spec)
        assert train is ds and test is ds
    finally:
        registry.LOADERS.pop("tiny_test_source", None)
    with pytest.raises(ValueError, match="unknown data source 'tiny_test_source'"):
        load_source(spec)  # validated while registered, loaded after removal


def test_data_spec_validation() -> None:
    with pytest.raises(ValidationError):
        DataSpec(source="imagenet")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        DataSpec(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        DataSpec(holdout_fraction=1.0)
