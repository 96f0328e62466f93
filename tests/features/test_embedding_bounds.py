"""The embedder's per-width and per-model state stays bounded when every record brings a new width or a new
model name (both come from the records), without changing a single point."""

from __future__ import annotations

import warnings

import numpy as np

from detector.domain import Query, Requested
from detector.features.embedding import MAX_LEARNED_SCALES, MAX_PROJECTIONS, ModelScale, QueryEmbedder


def query(model: str, width: int) -> Query:
    vector = np.linspace(-1.0, 1.0, width, dtype=np.float32)
    return Query("e", 0, 1, 1.0, model, None, "c", None, None, vector, None, Requested.LABEL, None, None)


def test_a_new_width_per_record_keeps_a_bounded_number_of_projections() -> None:
    embedder = QueryEmbedder(scales={"m": ModelScale.fixed(np.zeros(3), np.ones(3))})
    [first] = embedder.observe([query("m", 3)])
    for width in range(4, 4 + 5 * MAX_PROJECTIONS):
        embedder.observe([query(f"model-{width}", width)])
    assert len(embedder._projections) == MAX_PROJECTIONS
    [again] = embedder.observe([query("m", 3)])  # its projection was dropped and is made again, identical
    assert np.array_equal(first.point, again.point)


def test_a_new_model_per_record_keeps_the_given_scales_and_a_bounded_number_learned() -> None:
    given = ModelScale.fixed(np.zeros(3), np.ones(3))
    embedder = QueryEmbedder(scales={"trained": given})
    for index in range(3 * MAX_LEARNED_SCALES):
        embedder.observe([query(f"model-{index}", 3)])
    assert len(embedder.scales) == MAX_LEARNED_SCALES + 1
    assert embedder.scales["trained"] is given
    assert f"model-{3 * MAX_LEARNED_SCALES - 1}" in embedder.scales and "model-0" not in embedder.scales


def test_values_at_the_edge_of_float32_give_finite_points_without_warnings() -> None:
    # The decoder accepts any finite float32; rounding for the fingerprint used to overflow (a warning, and
    # one fingerprint for every such row).
    embedder = QueryEmbedder(scales={"m": ModelScale.fixed(np.zeros(3), np.ones(3))})
    edge = query("m", 3)
    edge.vector = np.array([3.4e38, -3.4e38, 1e-45], dtype=np.float32)
    other = query("m", 3)
    other.vector = np.array([3.3e38, -3.4e38, 1e-45], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first, second = embedder.observe([edge, other])
    assert first.fingerprint != second.fingerprint
