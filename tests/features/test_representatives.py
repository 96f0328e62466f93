"""Cluster representatives: quantised within a known error for every slot, exact for the recent ones (where
a boundary walk's tiny steps are measured), the invariant view kept so too, and a state that restores them
exactly; a state stored with float32 points for every slot still restores."""

from __future__ import annotations

import numpy as np
import pytest

from detector.features import state_bytes
from detector.features.clusters import MatchKind, RecordClusters
from detector.features.embedding import PROJECTION_DIM, pack
from detector.features.representatives import EXACT_ROWS, HOT, Representatives, quantised
from tests.streams import Stream, boundary_walk, warmed_tracker


def points(count: int, seed: int = 3) -> np.ndarray:
    """`count` points of unrelated records (~1 apart)."""
    return np.random.default_rng(seed).normal(0.0, 0.125, (count, PROJECTION_DIM)).astype(np.float32)


def filled(rows: np.ndarray) -> Representatives:
    """Representatives of `rows`, slot i put at time i + 1."""
    kept = Representatives(capacity=rows.shape[0])
    for slot, point in enumerate(rows):
        kept.put(slot, point, None, slot + 1)
    return kept


def test_quantised_rows_are_within_half_a_step_of_each_coordinate() -> None:
    rows = np.vstack([points(50), np.zeros((1, PROJECTION_DIM)), np.full((1, PROJECTION_DIM), 3e38)])
    codes, scales = quantised(rows.astype(np.float32))
    assert codes.dtype == np.int8 and scales.dtype == np.float32
    error = np.abs(codes * scales[:, None] - rows)
    assert np.all(error <= scales[:, None] / 2 * 1.001)
    assert scales[50] == 1.0 and not codes[50].any()  # a zero row
    assert np.isfinite(codes * scales[:, None]).all()


def test_the_nearest_slot_is_measured_exactly_when_recent_and_within_the_quantisation_error_when_older() -> (
    None
):
    rows = points(3 * HOT + 8)
    used = rows.shape[0]
    kept = filled(rows)
    for slot in (0, HOT, used - EXACT_ROWS - 1, used - HOT, used - 1):
        query = rows[slot] + np.float32(1e-4)  # a boundary walk's step: far below the quantisation error
        exact = float(((rows[slot] - query) ** 2).sum())
        found, squared = kept.nearest(query, used)
        assert found == slot
        if slot >= used - HOT:  # at least the HOT put last are exact
            assert squared == pytest.approx(exact, rel=1e-4)
        else:  # and at most the EXACT_ROWS put last
            assert squared != pytest.approx(exact, rel=1e-2) and np.sqrt(squared) < 0.02
    far = points(1, seed=11)[0]
    found, squared = kept.nearest(far, used)
    distances = np.sqrt(((rows - far) ** 2).sum(axis=1))
    assert abs(np.sqrt(squared) - distances.min()) < 0.02 and distances[found] - distances.min() < 0.02


def test_a_touched_old_slot_becomes_exact_again_and_the_least_recent_are_quantised_together() -> None:
    rows = points(EXACT_ROWS + 1)
    used = rows.shape[0]
    spare = EXACT_ROWS - HOT
    kept = filled(rows)  # the last put quantised the `spare` put first
    query = rows[0] + np.float32(1e-4)
    assert kept.nearest(query, used)[0] == 0 and kept.nearest(query, used)[1] > 1e-6  # known quantised
    kept.touch(0, None, now=used + 1)
    assert kept.nearest(query, used)[1] > 1e-6  # exact again, but its exact point was lost
    kept.put(0, rows[0], None, now=used + 2)
    assert kept.nearest(query, used)[1] < 1e-6
    assert kept.nearest(rows[spare - 1], used) != (spare - 1, 0.0)  # quantised with the first
    assert kept.nearest(rows[spare], used) == (spare, 0.0)  # the oldest of those kept exact


def test_the_invariant_view_reaches_every_slot_exact_when_recent_quantised_when_older() -> None:
    rows = points(3 * HOT + 8)
    used = rows.shape[0]
    kept = Representatives(capacity=used)
    for slot, point in enumerate(rows):
        kept.put(slot, point, -point, slot + 1)  # an invariant view of its own, unlike the point
    assert kept.nearest_invariant(-rows[used - 1], used) == (used - 1, 0.0)
    for slot in (0, HOT, used - EXACT_ROWS - 1):
        found, squared = kept.nearest_invariant(-rows[slot], used) or (-1, 1.0)
        assert found == slot and 0.0 < squared < 0.02**2
    text = Representatives()
    text.put(0, rows[0], None, 1)
    assert text.nearest_invariant(rows[0], 1) is None


def test_slots_without_an_invariant_view_are_never_the_nearest_in_it() -> None:
    rows = points(3 * HOT)
    used = rows.shape[0]
    kept = Representatives(capacity=used)
    for slot, point in enumerate(rows):  # every other slot without one (a client sending two widths)
        kept.put(slot, point, point if slot % 2 else None, slot + 1)
    for slot in (0, 2, used - 2):
        found, _ = kept.nearest_invariant(rows[slot], used) or (0, 1.0)
        assert found % 2 == 1
    found, squared = kept.nearest_invariant(rows[1], used) or (0, 1.0)
    assert found == 1 and squared < 0.02**2


def test_a_boundary_walk_of_steps_finer_than_the_quantisation_stays_one_cluster_measured_exactly() -> None:
    tracker = warmed_tracker()
    observations = list(tracker.observe(boundary_walk(Stream("walker"), steps=200)))
    clusters = RecordClusters()
    matches = [clusters.assign(observation) for observation in observations]
    variants = [match for match in matches if match.kind is MatchKind.VARIANT]
    assert len(variants) >= 150 and len({match.cluster for match in variants}) <= 3
    previous = [observations[index - 1].point for index, match in enumerate(matches) if index]
    steps = [float(np.linalg.norm(o.point - p)) for o, p in zip(observations[1:], previous, strict=True)]
    # The distance a variant reports is the exact step from its cluster's latest member.
    for match, step in zip(matches[1:], steps, strict=True):
        if match.kind is MatchKind.VARIANT and match.gap == 1:
            assert abs(match.distance - step) < 1e-5


def test_state_round_trips_exactly() -> None:
    rows = points(2 * HOT + 10)
    used = rows.shape[0]
    kept = Representatives(capacity=used)
    for slot, point in enumerate(rows):
        kept.put(slot, point, point, slot + 1)
    kept.put(used - 1, rows[3], rows[3], now=100)
    restored = Representatives.from_state(kept.state(used), used, capacity=used + 10)
    assert state_bytes.dumps(restored.state(used)) == state_bytes.dumps(kept.state(used))
    for query in [*points(5, seed=9), rows[0], rows[-1], rows[3] + np.float32(1e-4)]:
        assert restored.nearest(query, used) == kept.nearest(query, used)
        assert restored.nearest_invariant(query, used) == kept.nearest_invariant(query, used)
    for other in (restored, kept):  # both go on alike
        other.put(0, rows[5], rows[5], now=101)
    assert state_bytes.dumps(restored.state(used)) == state_bytes.dumps(kept.state(used))


def test_a_state_stored_with_exact_points_for_every_cluster_restores_them_quantised_the_recent_exact() -> (
    None
):
    rows = points(HOT + 20)
    clusters = RecordClusters()
    state = clusters.state()
    used = rows.shape[0]
    touched = list(range(1, used + 1))
    state |= {
        "ids": list(range(used)),
        "labels": [None] * used,
        "sizes": [1] * used,
        "touched_at": touched,
        "sequence": used,
        "next_id": used,
    }
    del state["representatives"], state["runs"]  # neither was stored then
    state |= {"points": pack(rows), "invariants": None}  # as stored before representatives were quantised

    restored = RecordClusters.from_state(state)
    assert len(restored) == used
    representatives = restored._representatives
    assert representatives.nearest(rows[-1], used) == (used - 1, 0.0)  # the most recent: exact
    slot, squared = representatives.nearest(rows[0], used)
    assert slot == 0 and 0.0 < squared < 0.02**2
    assert restored.state()["representatives"]["exact_slots"].tolist() == list(range(used - HOT, used))


def test_the_exact_rows_grow_with_the_slots_up_to_exact_rows() -> None:
    rows = points(EXACT_ROWS + 8)
    last = rows.shape[0] - 1
    kept = Representatives()  # four slots, as a client's clusters start
    held = [kept._exact_points.shape[0]]
    for slot, point in enumerate(rows):
        if slot == kept._points.codes.shape[0]:
            kept.grow(slot + slot // 2)
            held.append(kept._exact_points.shape[0])
        kept.put(slot, point, point, slot + 1)
    assert held[0] == 4 and held[-1] == EXACT_ROWS and held == sorted(held)
    for slot in (0, last):
        assert kept.nearest(rows[slot], rows.shape[0])[0] == slot
    assert kept.nearest(rows[last], rows.shape[0])[1] == 0.0
    # The put that found every row in use quantised the first `EXACT_ROWS - HOT`; the last 8 filled them.
    oldest_exact = EXACT_ROWS - HOT
    assert kept.nearest(rows[oldest_exact], rows.shape[0]) == (oldest_exact, 0.0)
    assert kept.nearest(rows[oldest_exact - 1], rows.shape[0])[1] > 0.0
    # The invariant views go the same way.
    assert kept.nearest_invariant(rows[oldest_exact], rows.shape[0]) == (oldest_exact, 0.0)
    found, squared = kept.nearest_invariant(rows[oldest_exact - 1], rows.shape[0]) or (-1, 0.0)
    assert found == oldest_exact - 1 and squared > 0.0


def test_a_state_holding_more_exact_rows_than_kept_restores_the_older_quantised() -> None:
    rows = points(EXACT_ROWS + 16)
    used = rows.shape[0]
    stored_exact = list(range(used - EXACT_ROWS - 8, used))  # as a version keeping more exact rows stored
    codes, scales = quantised(rows)
    state = {
        "codes": pack(codes, "<i1"),
        "scales": pack(scales),
        "exact_slots": stored_exact,
        "exact_points": pack(rows[stored_exact]),
        "exact_invariants": pack(rows[stored_exact]),
        "exact_touched": [slot + 1 for slot in stored_exact],
    }
    restored = Representatives.from_state(state, used, capacity=used)
    assert restored.state(used)["exact_slots"].tolist() == list(range(used - HOT, used))
    assert restored.nearest(rows[-1], used) == (used - 1, 0.0)
    slot, squared = restored.nearest(rows[stored_exact[0]] + np.float32(1e-4), used)
    assert slot == stored_exact[0] and 1e-6 < squared < 0.02**2
    assert restored.nearest_invariant(rows[used - HOT], used) == (used - HOT, 0.0)
    # The older exact rows' invariant views are quantised with them; the slots quantised before had none.
    found, squared = restored.nearest_invariant(rows[used - HOT - 1], used) or (-1, 0.0)
    assert found == used - HOT - 1 and 0.0 < squared < 0.02**2
    assert (restored.nearest_invariant(rows[0], used) or (0, 0.0))[0] >= stored_exact[0]
