"""make_splits: sizes, disjointness, determinism, digests, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from conceptguard.data import (
    ArrayDataset,
    DataMismatch,
    SplitSpec,
    check_same_data,
    make_splits,
    sample_digest,
)
from conceptguard.data.splits import Splits

SPEC = SplitSpec(seed=0, fit=100, reference=50, calibration=30, test=200)


def _train_parts(splits: Splits) -> list[np.ndarray]:
    return [splits.classifier_train, splits.fit, splits.reference, splits.calibration]


def test_sizes_and_dtypes() -> None:
    splits = make_splits(1000, 500, SPEC)
    assert [len(a) for a in _train_parts(splits)] == [820, 100, 50, 30]
    assert len(splits.test) == 200
    for array in [*_train_parts(splits), splits.test]:
        assert array.dtype == np.int64
        assert not array.flags.writeable


def test_disjoint_and_cover_train_set() -> None:
    splits = make_splits(1000, 500, SPEC)
    merged = np.concatenate(_train_parts(splits))
    assert len(np.unique(merged)) == len(merged) == 1000
    assert merged.min() == 0 and merged.max() == 999
    assert len(np.unique(splits.test)) == 200
    assert splits.test.min() >= 0 and splits.test.max() < 500


def test_pool_is_the_permutation_prefix() -> None:
    splits = make_splits(1000, 500, SPEC)
    perm = np.random.default_rng(0).permutation(1000)
    np.testing.assert_array_equal(splits.fit, np.sort(perm[:100]))
    np.testing.assert_array_equal(splits.reference, np.sort(perm[100:150]))
    np.testing.assert_array_equal(splits.calibration, np.sort(perm[150:180]))


def test_classifier_train_truncated_and_test_none() -> None:
    spec = SPEC.model_copy(update={"classifier_train": 300, "test": None})
    splits = make_splits(1000, 500, spec)
    assert len(splits.classifier_train) == 300
    np.testing.assert_array_equal(splits.test, np.arange(500))
    pool = np.concatenate([splits.fit, splits.reference, splits.calibration])
    assert not np.intersect1d(splits.classifier_train, pool).size


def test_deterministic_for_a_seed_and_different_for_another() -> None:
    a, b = make_splits(1000, 500, SPEC), make_splits(1000, 500, SPEC)
    for x, y in zip([*_train_parts(a), a.test], [*_train_parts(b), b.test], strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.digest() == b.digest()
    c = make_splits(1000, 500, SPEC.model_copy(update={"seed": 1}))
    assert not np.array_equal(a.fit, c.fit)
    assert not np.array_equal(a.test, c.test)
    assert a.digest() != c.digest()
    assert len(a.digest()) == 64 and int(a.digest(), 16) >= 0


def test_test_subset_does_not_depend_on_train_size() -> None:
    a, b = make_splits(1000, 500, SPEC), make_splits(2000, 500, SPEC)
    np.testing.assert_array_equal(a.test, b.test)


def test_summary_is_json_able() -> None:
    summary = make_splits(1000, 500, SPEC).summary()
    assert json.loads(json.dumps(summary)) == {
        "seed": 0, "n_train": 1000, "n_test": 500, "classifier_train": 820, "fit": 100,
        "reference": 50, "calibration": 30, "test": 200}


def test_errors() -> None:
    with pytest.raises(ValueError, match="exceeds the train set of 150"):
        make_splits(150, 500, SPEC)
    with pytest.raises(ValueError, match="classifier_train=900 exceeds"):
        make_splits(1000, 500, SPEC.model_copy(update={"classifier_train": 900}))
    with pytest.raises(ValueError, match="test=200 exceeds"):
        make_splits(1000, 100, SPEC)


def test_spec_validation() -> None:
    with pytest.raises(ValidationError):
        SplitSpec(fit=1, reference=1, calibration=1, extra_field=2)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        SplitSpec(fit=-1, reference=1, calibration=1)
    with pytest.raises(ValidationError):
        SplitSpec(fit=1, reference=1)  # type: ignore[call-arg]


def test_pool_may_fill_the_train_set() -> None:
    splits = make_splits(180, 200, SPEC)
    assert len(splits.classifier_train) == 0
    assert splits.summary()["fit"] == 100


def _tiny(n: int, seed: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset("tiny", rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8),
                        rng.integers(0, 3, n), ["a", "b", "c"])


def test_sample_digest_sees_the_content_and_check_same_data_refuses_other_data() -> None:
    """The digest follows a sampled image or label, not only the indices; a bank's record
    refuses other data under the same splits, and says where a relative root resolves."""
    train, test = _tiny(200, 0), _tiny(50, 1)
    splits = make_splits(200, 50, SplitSpec(fit=20, reference=60, calibration=20))
    digest = sample_digest(train, test, splits, n=8)
    assert digest == sample_digest(_tiny(200, 0), _tiny(50, 1), splits, n=8)
    picked = splits.reference[0]  # the first sampled reference index
    changed = _tiny(200, 0)
    changed.images[picked] ^= 1
    assert sample_digest(changed, test, splits, n=8) != digest
    relabelled = _tiny(200, 0)
    relabelled.labels[picked] = (relabelled.labels[picked] + 1) % 3
    assert sample_digest(relabelled, test, splits, n=8) != digest
    unsampled = int(splits.reference[1])  # 60 indices, 8 sampled: the second is not one
    other = _tiny(200, 0)
    other.images[unsampled] ^= 1
    assert sample_digest(other, test, splits, n=8) == digest

    record = {"splits_digest": splits.digest(),
              "sample_digest": sample_digest(train, test, splits)}
    check_same_data(record, train, test, splits, "data")  # the same data: no error
    with pytest.raises(DataMismatch, match=r"relative: it resolves against the current"):
        check_same_data(record, changed, test, splits, "data")
    check_same_data({"splits_digest": splits.digest()}, changed, test, splits, "data")  # old
    other_splits = make_splits(200, 50, SplitSpec(seed=1, fit=20, reference=60,
                                                  calibration=20))
    check_same_data(record, changed, test, other_splits, "data")  # other splits: reported
