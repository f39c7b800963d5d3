"""Seeded, disjoint index splits: classifier training, and the monitor's fit/reference/calibration.

The train set is permuted with ``np.random.default_rng(seed)``; the first
``fit + reference + calibration`` permuted indices form the monitor pool (fit, then reference,
then calibration), the rest train the classifier (the first ``classifier_train`` of them when
set). Test indices come from the official test set: all of it, or a seeded subset of ``test``.
Each split's indices are stored sorted (membership is what the seed decides).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SPLIT_NAMES = ("classifier_train", "fit", "reference", "calibration", "test")


class SplitSpec(BaseModel):
    """Sizes of the splits and the seed that draws them."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    classifier_train: int | None = Field(None, ge=0)  # None: all of the train set minus the pool
    fit: int = Field(ge=0)
    reference: int = Field(ge=0)
    calibration: int = Field(ge=0)
    test: int | None = Field(None, ge=1)  # None: the whole official test set

    @property
    def pool(self) -> int:
        return self.fit + self.reference + self.calibration


@dataclass(frozen=True, eq=False)
class Splits:
    """int64 index arrays (read-only): the first four index the train set, ``test`` the test set."""

    seed: int
    n_train: int
    n_test: int
    classifier_train: np.ndarray
    fit: np.ndarray
    reference: np.ndarray
    calibration: np.ndarray
    test: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in SPLIT_NAMES}

    def digest(self) -> str:
        """sha256 hex over every split's name, length and indices (for caches and manifests)."""
        h = hashlib.sha256()
        for name, indices in self.arrays().items():
            h.update(f"{name}:{len(indices)}:".encode())
            h.update(indices.astype("<i8").tobytes())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """JSON-able sizes and seed."""
        sizes = {name: len(indices) for name, indices in self.arrays().items()}
        return {"seed": self.seed, "n_train": self.n_train, "n_test": self.n_test, **sizes}


def make_splits(n_train: int, n_test: int, spec: SplitSpec) -> Splits:
    """Draw the splits for a train set of ``n_train`` and a test set of ``n_test`` items."""
    if n_train < 0 or n_test < 0:
        raise ValueError(f"set sizes must be non-negative, got n_train={n_train}, n_test={n_test}")
    if spec.pool > n_train:
        raise ValueError(f"monitor pool fit+reference+calibration={spec.pool} exceeds the "
                         f"train set of {n_train}")
    perm = np.random.default_rng(spec.seed).permutation(n_train)
    bounds = np.cumsum([spec.fit, spec.reference, spec.calibration])
    fit, reference, calibration, rest = np.split(perm, bounds)
    return Splits(spec.seed, n_train, n_test, _frozen(_classifier_part(rest, spec)),
                  _frozen(fit), _frozen(reference), _frozen(calibration),
                  _frozen(_test_part(n_test, spec)))


def _classifier_part(rest: np.ndarray, spec: SplitSpec) -> np.ndarray:
    if spec.classifier_train is None:
        return rest
    if spec.classifier_train > len(rest):
        raise ValueError(f"classifier_train={spec.classifier_train} exceeds the {len(rest)} "
                         f"train items left after the monitor pool of {spec.pool}")
    return rest[:spec.classifier_train]


def _test_part(n_test: int, spec: SplitSpec) -> np.ndarray:
    if spec.test is None or spec.test == n_test:
        return np.arange(n_test)
    if spec.test > n_test:
        raise ValueError(f"test={spec.test} exceeds the test set of {n_test}")
    # A stream of its own, so the test subset does not depend on n_train.
    rng = np.random.default_rng([spec.seed, 1])
    return rng.choice(n_test, size=spec.test, replace=False)


def _frozen(indices: np.ndarray) -> np.ndarray:
    out = np.sort(indices).astype(np.int64)
    out.setflags(write=False)
    return out


def sample_digest(train: Any, test: Any, splits: Splits, n: int = 32) -> str:
    """sha256 hex over ``n`` evenly spaced images and their labels of the reference split
    (from ``train``) and of the test split (from ``test``): what the data holds, not only
    how it is split, so that a job reading the same relative ``data.root`` from another
    folder (other images, same counts) is told. Decodes only those ``2 n`` images."""
    h = hashlib.sha256()
    for name, source, indices in (("reference", train, splits.reference),
                                  ("test", test, splits.test)):
        picked = indices[np.unique(np.linspace(0, len(indices) - 1, min(n, len(indices)))
                                   .astype(np.int64))] if len(indices) else indices
        h.update(f"{name}:{len(picked)}:".encode())
        h.update(np.ascontiguousarray(np.asarray(source.images[picked], np.uint8)).tobytes())
        h.update(np.asarray(source.labels[picked], "<i8").tobytes())
    return h.hexdigest()


class DataMismatch(ValueError):
    """The data a job reads is not the data a bank was built on."""


def check_same_data(recorded: dict[str, Any], train: Any, test: Any, splits: Splits,
                    root: Any) -> None:
    """:class:`DataMismatch` when ``splits`` are the bank's (``recorded``: the manifest's
    ``data``, same split digest) but :func:`sample_digest` of what they hold is not. Banks
    built before the sample digest, and other splits (reported as such), are not checked."""
    expected = recorded.get("sample_digest")
    if expected is None or recorded.get("splits_digest") != splits.digest():
        return
    if sample_digest(train, test, splits) != expected:
        where = "" if root is None else (
            f" at {Path(root).resolve()}" + ("" if Path(root).is_absolute() else
                                              f" (data.root {root!s} is relative: it "
                                              f"resolves against the current folder, "
                                              f"{Path.cwd()})"))
        raise DataMismatch(
            f"the data{where} is not the data the bank was built on: the splits are the "
            "bank's, but a sample of their images or labels differs. Run from the folder "
            "the bank was built in, or pass --config with the bank's data")
