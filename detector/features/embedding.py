"""From queries to comparable points: per-model feature scaling, random projection, and fingerprints.

Every query becomes an `Observation`: a small float32 `point` in which the distance between two queries is
their scaled Euclidean distance divided by the typical distance between unrelated records (so ~1 for two
unrelated records, ~0 for near-copies, whatever the model's input width), an optional `invariant` point for
image-like rows (square grey or colour images) that stays put under the augmentations label-only attacks
use (shifts, flips), and an exact `fingerprint`. Text (BYTES) inputs use hashed character trigrams in place
of numeric features.
"""

from __future__ import annotations

import base64
import hashlib
import math
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import orjson

from detector.domain import Query

PROJECTION_DIM = 32
TEXT_BUCKETS = 512
MIN_IMAGE_SIDE = 8
WARMUP_QUERIES = 256
# Input widths and model names come from the records, so an attacker can send a new one with each: the
# projections (width x 32 floats each, 8 MiB at 65,536 features) and the scales learned online are kept for
# the most recently used few. A projection dropped is made again, identical, when its width comes back.
MAX_PROJECTIONS = 64
MAX_LEARNED_SCALES = 256


def pack(values: np.ndarray, dtype: str = "<f4") -> str:
    """`values` as base64 text of `dtype` (little-endian float32 by default): exact for values of that type,
    and a third of the size of decimal numbers."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def unpack(text: str, dtype: str = "<f4") -> np.ndarray:
    """The values `pack` wrote as `dtype`, as a new (writable) flat array of the native type."""
    return np.frombuffer(base64.b64decode(text), dtype=dtype).astype(np.dtype(dtype).newbyteorder("="))


@dataclass(slots=True)
class Observation:
    """A query with what features need of it: comparable points, a fingerprint, a training-set hit."""

    query: Query
    point: np.ndarray
    invariant: np.ndarray | None
    fingerprint: int
    raw: np.ndarray | None  # the row itself, to tell which coordinates a variant changed
    training_hit: int = 0  # 0 none, 1 near, 2 exact


def fingerprint_of(values: bytes) -> int:
    """A stable 64-bit fingerprint (process-independent, unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(values, digest_size=8).digest(), "little")


@dataclass
class ModelScale:
    """Running mean and variance per input feature of one model (Welford), frozen once warmed up.

    Freezing keeps distances comparable over time: a scale that kept moving would make the same pair of
    queries near at one moment and far at another.
    """

    width: int
    count: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    frozen: bool = False

    def __post_init__(self) -> None:
        if self.mean.size == 0:
            self.mean = np.zeros(self.width)
            self.m2 = np.zeros(self.width)

    @classmethod
    def fixed(cls, mean: np.ndarray, std: np.ndarray) -> ModelScale:
        """A scale known in advance (from the baseline the detector was trained on)."""
        width = mean.shape[0]
        return cls(
            width,
            WARMUP_QUERIES,
            mean.astype(np.float64),
            (std.astype(np.float64) ** 2) * WARMUP_QUERIES,
            True,
        )

    def learn(self, rows: np.ndarray) -> None:
        """Fold a [n, width] block of rows into the running statistics (until frozen)."""
        if self.frozen:
            return
        for row in rows.astype(np.float64):
            self.count += 1
            delta = row - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (row - self.mean)
        if self.count >= WARMUP_QUERIES:
            self.frozen = True

    def scale(self, rows: np.ndarray) -> np.ndarray:
        """A [n, width] block of rows, scaled, learning from them first while not frozen.

        While the scale is learned each row is scaled by what was learned up to and including it: a row's
        point is then the same however the stream was batched.
        """
        if self.frozen:
            frozen: np.ndarray = (rows - self.mean) / self.std
            return frozen
        scaled = np.empty(rows.shape, dtype=np.float64)
        for index in range(rows.shape[0]):
            self.learn(rows[index : index + 1])
            scaled[index] = (rows[index] - self.mean) / self.std
        return scaled

    def to_bytes(self) -> bytes:
        """The scale as stored: its counts and its statistics (float64, exact)."""
        return orjson.dumps(
            {
                "width": self.width,
                "count": self.count,
                "frozen": self.frozen,
                "mean": pack(self.mean, "<f8"),
                "m2": pack(self.m2, "<f8"),
            }
        )

    @classmethod
    def from_bytes(cls, stored: bytes) -> ModelScale:
        """The scale `to_bytes` wrote; raises `ValueError` on anything else."""
        try:
            state = orjson.loads(stored)
            width = int(state["width"])
            mean, m2 = unpack(state["mean"], "<f8"), unpack(state["m2"], "<f8")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a stored input scale: {exc!r}") from None
        if mean.shape != (width,) or m2.shape != (width,):
            raise ValueError(f"a stored input scale of width {width} holds {mean.size} means")
        return cls(width, int(state["count"]), mean, m2, bool(state["frozen"]))

    @property
    def std(self) -> np.ndarray:
        """Per-feature standard deviation, never zero (constant features count as unit-scaled)."""
        if self.count < 2:
            return np.ones(self.width)
        std = np.sqrt(self.m2 / (self.count - 1))
        return np.where(std > 1e-9, std, 1.0)


class QueryEmbedder:
    """Turns queries into observations, one micro-batch at a time (one matrix product per input width)."""

    def __init__(self, scales: dict[str, ModelScale] | None = None, seed: int = 20261129) -> None:
        self._scales: OrderedDict[str, ModelScale] = OrderedDict(scales or {})
        self._given = frozenset(self._scales)  # from the trained model: never dropped
        self._seed = seed
        self._projections: OrderedDict[int, np.ndarray] = OrderedDict()
        self._learning: set[str] = set()  # models whose learned scale changed since it was last stored

    @property
    def scales(self) -> dict[str, ModelScale]:
        """The per-model scales in use (learned online unless given)."""
        return self._scales

    def learned(self) -> dict[str, ModelScale]:
        """The scales learned online that changed since `stored` was last told of them: what to store."""
        return {model: self._scales[model] for model in self._learning if model in self._scales}

    def stored(self, models: Iterable[str]) -> None:
        """Note that the learned scales of `models` (from `learned`) are stored."""
        self._learning.difference_update(models)

    def adopt(self, stored: Mapping[str, bytes]) -> None:
        """Go on from stored learned scales (`ModelScale.to_bytes`), for models without a given one, in
        place of what was learned since (which was not stored); an unreadable one is learned afresh."""
        for model, state in stored.items():
            if model in self._given:
                continue
            try:
                self._scales[model] = ModelScale.from_bytes(state)
            except ValueError:
                self._scales.pop(model, None)
        for model in self._learning - set(stored):
            self._scales.pop(model, None)  # learned from records that will come again, and never stored
        self._learning.clear()

    def observe(self, queries: list[Query]) -> list[Observation]:
        """One observation per query, in order."""
        observations: list[Observation | None] = [None] * len(queries)
        numeric: dict[tuple[str, int], list[int]] = {}
        for index, query in enumerate(queries):
            if query.vector is not None and query.vector.size:
                numeric.setdefault((query.model, query.vector.size), []).append(index)
            else:
                observations[index] = self._text_observation(query)
        for (model, width), indices in numeric.items():
            rows = np.stack([queries[i].vector for i in indices]).astype(np.float32, copy=False)  # type: ignore[misc]
            scaled = self._scale(model, width).scale(rows)
            points = (scaled @ self._projection(width)).astype(np.float32)
            side, channels = _image_shape(width)
            invariants = (
                _image_invariants(
                    _grey_images(rows, side, channels), self._projection(side * side), tapered=channels > 1
                )
                if side
                else None
            )
            # Rounding scales by 1e5 first: float32 values beyond ~3e33 overflow, and have no decimals anyway.
            with np.errstate(over="ignore", invalid="ignore"):
                rounded = np.round(rows, 5)
            quantised = np.where(np.isfinite(rounded), rounded, rows)
            for position, index in enumerate(indices):
                observations[index] = Observation(
                    query=queries[index],
                    point=points[position],
                    invariant=None if invariants is None else invariants[position],
                    fingerprint=fingerprint_of(quantised[position].tobytes()),
                    raw=rows[position],
                )
        return [observation for observation in observations if observation is not None]

    def _scale(self, model: str, width: int) -> ModelScale:
        scale = self._scales.get(model)
        if scale is None or scale.width != width:
            scale = self._scales[model] = ModelScale(width)
        self._scales.move_to_end(model)
        if not scale.frozen:
            self._learning.add(model)
        if len(self._scales) - len(self._given) > MAX_LEARNED_SCALES:
            oldest = next(name for name in self._scales if name not in self._given)
            del self._scales[oldest]
        return scale

    def _projection(self, width: int) -> np.ndarray:
        """A fixed Gaussian projection [width, PROJECTION_DIM], scaled so unrelated records are ~1 apart."""
        projection = self._projections.get(width)
        if projection is not None:
            self._projections.move_to_end(width)
        else:
            rng = np.random.default_rng([self._seed, width])
            # E|P(a-b)|^2 = |a-b|^2 for N(0, 1/k) entries, and |a-b|^2 ~ 2*width for unrelated scaled rows.
            projection = rng.normal(0.0, 1.0 / math.sqrt(PROJECTION_DIM), (width, PROJECTION_DIM))
            projection = (projection / math.sqrt(2.0 * width)).astype(np.float32)
            self._projections[width] = projection
            if len(self._projections) > MAX_PROJECTIONS:
                self._projections.popitem(last=False)
        return projection

    def _text_observation(self, query: Query) -> Observation:
        text = query.text or ""
        sketch = text_sketch(text)
        point = (sketch @ self._projection(TEXT_BUCKETS)) * math.sqrt(TEXT_BUCKETS)
        return Observation(
            query=query,
            point=point.astype(np.float32),
            invariant=None,
            fingerprint=fingerprint_of(text.encode()),
            raw=None,
        )


def text_sketch(text: str) -> np.ndarray:
    """Hashed character-trigram counts of `text`, L2-normalised ([TEXT_BUCKETS] float32).

    Two prompts sharing most of their trigrams are close; unrelated prompts are ~sqrt(2) apart.
    """
    counts = np.zeros(TEXT_BUCKETS, dtype=np.float32)
    normalised = " ".join(text.lower().split())
    for start in range(max(len(normalised) - 2, 1)):
        counts[zlib.crc32(normalised[start : start + 3].encode()) % TEXT_BUCKETS] += 1.0
    norm = float(np.linalg.norm(counts))
    return counts / norm if norm else counts


def _image_shape(width: int) -> tuple[int, int]:
    """The side and channels of image-like rows of `width`: a square grey image (side x side, 1 channel)
    or a square colour one (3 x side x side) of at least `MIN_IMAGE_SIDE` pixels a side; (0, 0) for any
    other width. No width is both: side² = 3 x other² has no solution in integers."""
    for channels in (1, 3):
        side = math.isqrt(width // channels)
        if side * side * channels == width and side >= MIN_IMAGE_SIDE:
            return side, channels
    return 0, 0


def _grey_images(rows: np.ndarray, side: int, channels: int) -> np.ndarray:
    """Rows of one width as [n, side, side] grey images: themselves, or the mean of their colour channels.

    A colour row comes channel by channel (3 planes, as PyTorch lays images out) or pixel by pixel (3 values
    a pixel, as TensorFlow and image files do); the records do not say which. Each row is read in the
    layout where vertically adjacent values differ less: in the right one they are pixels one row apart, in
    the wrong one pixels three rows apart (planes read as pixels) or a third of a row apart (pixels read as
    planes), and nearby pixels of an image are alike. Mirroring keeps those differences and a small shift
    barely moves them, so a row's copies are read in the layout of the row.
    """
    images = rows.astype(np.float64)
    if channels == 1:
        grey: np.ndarray = images.reshape(-1, side, side)
        return grey
    planar = images.reshape(-1, channels, side, side)
    interleaved = images.reshape(-1, side, side, channels)
    by_pixel = _vertical_steps(interleaved, 1) < _vertical_steps(planar, 2)
    chosen: np.ndarray = np.where(by_pixel[:, None, None], interleaved.mean(axis=3), planar.mean(axis=1))
    return chosen


def _vertical_steps(images: np.ndarray, axis: int) -> np.ndarray:
    """The mean absolute difference between vertical neighbours (along `axis`) of [n, a, b, c] images, one
    an image."""
    steps: np.ndarray = np.abs(np.diff(images, axis=axis)).mean(axis=(1, 2, 3))
    return steps


def _image_invariants(images: np.ndarray, projection: np.ndarray, *, tapered: bool) -> np.ndarray:
    """Points of [n, side, side] images that shifts and horizontal flips leave (nearly) unchanged, through
    `projection` of width side².

    The magnitude of the 2-D Fourier transform ignores circular shifts; adding that of the mirrored image
    removes the flip. Label-only membership attacks query exactly such variants. The transform sees an
    image as repeating. A digit on a blank canvas shifted over blank pixels is exactly circularly shifted,
    and is best left as it is. A photo fills its frame: a shift moves content off one edge and blank or
    mirrored pixels in at the other, which the transform sees as another image unless the edges weigh
    nothing. `tapered` images, less their mean, are tapered to zero at their edges (a Hann window) first:
    a photo shifted by a pixel then stays near. Tapering digits would undo their exact match (a 1-pixel
    shift of an 8x8 digit matched 50 % of the time untapered, 1 % tapered), so grey images, on a blank
    canvas in the datasets label-only attacks probe (digits, MNIST), are left untapered, and colour ones,
    photos, are tapered. Raw pixel values are used: per-pixel standardisation would weigh the empty borders
    of digits as much as their strokes. Each point is normalised so that the distance between two of them
    is, like `point`'s, about 1 when unrelated.
    """
    side = images.shape[1]
    if tapered:
        taper = np.hanning(side + 2)[1:-1]
        images = (images - images.mean(axis=(1, 2), keepdims=True)) * np.outer(taper, taper)
    magnitude = np.abs(np.fft.fft2(images)) + np.abs(np.fft.fft2(images[:, :, ::-1]))
    features = np.log1p(magnitude / 2.0).reshape(-1, side * side)
    features -= features.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    features /= np.where(norms > 0, norms, 1.0)
    # The projection maps distances d to d / sqrt(2 * width); unit vectors are at most 2 apart.
    points: np.ndarray = (features @ projection * math.sqrt(side * side)).astype(np.float32)
    return points
