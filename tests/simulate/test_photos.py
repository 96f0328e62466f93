"""Colour image records cut from the sample photographs: something in each, no two of one place."""

from __future__ import annotations

import numpy as np

from detector.simulate.photos import MIN_APART, MIN_CONTRAST, photo_patches


def test_patches_have_contrast_and_no_two_are_crops_of_one_place() -> None:
    patches = np.stack(photo_patches(60, 16, np.random.default_rng(3)))
    assert patches.shape == (60, 16, 16, 3) and patches.dtype == np.float32
    assert patches.min() >= 0.0 and patches.max() <= 1.0
    assert patches.std(axis=(1, 2, 3)).min() >= MIN_CONTRAST
    rows = patches.reshape(60, -1)
    apart = np.sqrt(((rows[:, None] - rows[None]) ** 2).mean(axis=2))
    assert apart[~np.eye(60, dtype=bool)].min() >= MIN_APART


def test_the_same_generator_cuts_the_same_patches() -> None:
    first = photo_patches(5, 32, np.random.default_rng(4))
    again = photo_patches(5, 32, np.random.default_rng(4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
