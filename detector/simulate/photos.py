"""Colour image records: square patches of the two photographs scikit-learn ships (`load_sample_images`),
for measuring how the detector matches copies of colour images (shifted, mirrored) to their records."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
from sklearn.datasets import load_sample_images

# A patch with less contrast than this is a flat stretch (sky, a wall): not an image anyone probes.
MIN_CONTRAST = 0.15
# Two patches whose pixels differ by less than this (root mean square) are crops of nearly one place.
MIN_APART = 0.1


@cache
def _photos() -> tuple[np.ndarray, ...]:
    return tuple(image.astype(np.float32) / 255.0 for image in load_sample_images().images)


def photo_patches(count: int, side: int, generator: np.random.Generator) -> list[np.ndarray]:
    """`count` [side, side, 3] patches (values 0 to 1) of the sample photographs at random places, each with
    something in it (a standard deviation of `MIN_CONTRAST` or more) and none a crop of nearly the same
    place as another (see `MIN_APART`)."""
    photos = _photos()
    patches = np.zeros((count, side, side, 3), dtype=np.float32)
    kept = 0
    while kept < count:
        photo = photos[generator.integers(len(photos))]
        top, left = generator.integers(photo.shape[0] - side), generator.integers(photo.shape[1] - side)
        patch = photo[top : top + side, left : left + side]
        nearest = np.sqrt(np.mean((patches[:kept] - patch) ** 2, axis=(1, 2, 3)).min(initial=1.0))
        if patch.std() >= MIN_CONTRAST and nearest >= MIN_APART:
            patches[kept] = patch
            kept += 1
    return list(patches)


def moved(image: np.ndarray, down: int, right: int, edge: str = "reflect") -> np.ndarray:
    """[side, side, channels] `image` moved by whole pixels (at most 2), `edge` ("reflect": mirrored, or
    "constant": blank) coming in where it moved away from."""
    side = image.shape[0]
    padded = np.pad(image, [(2, 2), (2, 2), (0, 0)], mode=edge)  # type: ignore[call-overload]
    shifted: np.ndarray = padded[2 - down : 2 - down + side, 2 - right : 2 - right + side]
    return shifted


# A [side, side, 3] image as a model's input row: grey (its channels' mean), channel by channel (PyTorch's
# layout) or pixel by pixel (TensorFlow's, and image files').
LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "grey": lambda image: image.mean(axis=2).ravel(),
    "planar": lambda image: image.transpose(2, 0, 1).ravel(),
    "interleaved": lambda image: image.ravel(),
}
