"""Corruptions and foreign sets: seeded, shaped like the data, and doing what they say."""

from __future__ import annotations

import numpy as np
import pytest

from conceptguard.foreign import FOREIGN_SETS, foreign_images
from conceptguard.shifts import CORRUPTIONS, corrupt


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.zeros((6, 28, 28, 1), np.uint8)
    x[:, 6:22, 8:20] = rng.integers(120, 255, size=(6, 16, 12, 1))
    return x


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruptions_are_seeded_and_grow_with_severity(images: np.ndarray, kind: str) -> None:
    a = corrupt(images, kind, 3, seed=5)
    assert a.dtype == np.uint8 and a.shape == images.shape
    np.testing.assert_array_equal(a, corrupt(images, kind, 3, seed=5))
    diff = [np.abs(corrupt(images, kind, s, seed=5).astype(float) - images).mean()
            for s in (1, 5)]
    assert diff[1] > diff[0] > 0


def test_corruption_arguments_are_checked(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "fog", 1, 0)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "contrast", 6, 0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images.astype(np.float32), "contrast", 1, 0)


def test_specific_corruptions_do_what_they_say(images: np.ndarray) -> None:
    inv = corrupt(images, "inversion", 5, 0)
    np.testing.assert_array_equal(inv, 255 - images)
    low = corrupt(images, "contrast", 5, 0).astype(float)
    assert low.std() < 0.2 * images.astype(float).std()
    occ = corrupt(images, "occlusion", 5, 0)
    assert ((occ != images).reshape(6, -1).any(1)).all()


@pytest.mark.parametrize("name", sorted(FOREIGN_SETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_foreign_sets_have_the_asked_shape_and_content(name: str, channels: int) -> None:
    x = foreign_images(name, 5, 32, channels, seed=1)
    assert x.shape == (5, 32, 32, channels) and x.dtype == np.uint8
    assert x.std() > 10  # not blank
    np.testing.assert_array_equal(x, foreign_images(name, 5, 32, channels, seed=1))
    assert foreign_images(name, 0, 32, channels, seed=1).shape == (0, 32, 32, channels)
    with pytest.raises(ValueError, match="unknown foreign set"):
        foreign_images("cifar", 1, 32, 1, 0)
