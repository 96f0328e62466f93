"""A client's record clusters stay within their bounds at any history length, give way least recently used
first, and a client restored after the bounds were reached goes on exactly as one that never stopped."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import orjson
import pytest

from detector.features import state_bytes
from detector.features.client import ClientFeatures
from detector.features.clusters import (
    MAX_CLUSTERS,
    MAX_FINGERPRINTS,
    NO_LABEL,
    FingerprintTable,
    MatchKind,
    RecordClusters,
    label_code,
)
from detector.features.columns import SEQUENCE_LIMIT
from detector.features.embedding import Observation
from detector.features.representatives import HOT, Representatives
from tests.streams import Stream, record, warmed_tracker


def distinct_observations(count: int) -> list[Observation]:
    """`count` observations of unrelated records (each one a new cluster)."""
    tracker = warmed_tracker()
    stream = Stream("heavy")
    return list(tracker.observe([stream.query(record()) for _ in range(count)]))


def pairs(columns: tuple[np.ndarray, np.ndarray]) -> list[tuple[int, int]]:
    """A fingerprint table's columns as (fingerprint, cluster id) pairs."""
    return list(zip(columns[0].tolist(), columns[1].tolist(), strict=True))


def held_bytes(clusters: RecordClusters) -> int:
    held: list[RecordClusters | FingerprintTable | Representatives] = [
        clusters,
        clusters._fingerprints,
        clusters._representatives,
    ]
    values = [getattr(part, name) for part in held for name in type(part).__slots__]
    arrays = [value for value in values if isinstance(value, np.ndarray)]
    return sum(array.nbytes for array in arrays)


def test_clusters_and_fingerprints_stay_within_their_bounds_however_long_the_history() -> None:
    observations = distinct_observations(MAX_FINGERPRINTS + 500)
    clusters = RecordClusters()
    matches = [clusters.assign(observation) for observation in observations]

    assert all(match.kind is MatchKind.NEW for match in matches)
    assert len(clusters) == MAX_CLUSTERS and len(clusters._fingerprints) == MAX_FINGERPRINTS
    # A cluster: 32 int8 codes, a float32 scale and norm, its exact row (int8), its id (int64), label
    # code, size and time (int32); up to 2 * HOT exact rows: a float32 point and norm, slot (int16) and time
    # (int32); a fingerprint: itself (uint64), its slot (int16) and time (int32); and the last row.
    last_row = observations[-1].raw.nbytes if observations[-1].raw is not None else 0
    bound = (
        MAX_CLUSTERS * (32 + 4 + 4 + 1 + 8 + 4 + 4 + 4)
        + 2 * HOT * (32 * 4 + 4 + 2 + 4)
        + MAX_FINGERPRINTS * (8 + 2 + 4)
        + last_row
    )
    assert held_bytes(clusters) <= bound


def test_a_client_holds_at_most_64_kib_however_long_its_history() -> None:
    tracker = warmed_tracker()
    stream = Stream("heavy")
    rng = np.random.default_rng(5)
    queries = [
        stream.query(record(), label=str(rng.integers(10)), probabilities=np.array([0.3, 0.7]))
        for _ in range(3 * MAX_FINGERPRINTS)
    ]
    observations = tracker.observe(queries)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    client = ClientFeatures()
    for observation in observations:
        client.update(observation)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(client.clusters) == MAX_CLUSTERS
    assert held <= 64 * 1024, held


def test_a_client_keeps_nothing_of_its_micro_batch_but_its_own_last_row() -> None:
    # One query of a client in a batch of thousands of wide rows from others: once the batch is gone,
    # the client holds its own row, not the batch's matrix.
    tracker = warmed_tracker()
    batch = [Stream("other").query(np.zeros(4_096, dtype=np.float32)) for _ in range(2_000)]
    batch.append(Stream("client").query(np.ones(4_096, dtype=np.float32)))
    tracker.observe(batch[:1])  # the tracker's projection and scale of the width, kept whatever the batch
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    observations = tracker.observe(batch)
    clusters = RecordClusters()
    clusters.assign(observations[-1])
    del observations
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert held < 256 * 1024, held  # the batch's rows are 32 MiB, the client's last row 16 KiB


def test_the_least_recently_matched_cluster_and_fingerprint_give_way() -> None:
    observations = distinct_observations(MAX_CLUSTERS + 2)
    clusters = RecordClusters()
    for observation in observations[:MAX_CLUSTERS]:
        clusters.assign(observation)
    kept = clusters.assign(observations[0])  # matched again: now the most recent
    assert kept.kind is MatchKind.EXACT and kept.gap == MAX_CLUSTERS

    clusters.assign(observations[MAX_CLUSTERS])  # takes the slot of the least recent: the second record's
    assert clusters.assign(observations[0]).kind is MatchKind.EXACT
    assert clusters.assign(observations[1]).kind is MatchKind.NEW


def test_a_fingerprint_table_drops_the_least_recently_used_and_keeps_its_order_through_its_columns() -> None:
    table = FingerprintTable()
    for fingerprint in range(MAX_FINGERPRINTS):
        table.put(2**63 + fingerprint, fingerprint % 200, now=fingerprint)
    assert table.get(2**63, now=MAX_FINGERPRINTS) == 0  # used: no longer the oldest
    table.put(7, 99, now=MAX_FINGERPRINTS + 1)

    assert table.get(2**63 + 1, now=MAX_FINGERPRINTS + 2) is None  # the oldest then, dropped
    assert table.get(7, now=MAX_FINGERPRINTS + 3) == 99
    ids = np.arange(200) + 1000  # the cluster id in each slot
    restored = FingerprintTable.of(*table.columns(ids), ids)
    assert pairs(restored.columns(ids)) == pairs(table.columns(ids)) and len(restored) == MAX_FINGERPRINTS
    restored.put(8, 100, now=0)  # drops the least recent of the restored ones
    assert restored.get(2**63 + 2, now=1) is None and restored.get(2**63, now=2) == 0

    restored.forget_slot(99)  # its cluster gave way to another
    assert restored.get(7, now=3) is None and restored.get(2**63 + 99, now=4) is None
    assert (7, -1) in pairs(restored.columns(ids))


def test_a_restored_fingerprint_table_finds_the_slot_of_each_cluster_held_and_none_of_the_others() -> None:
    ids = np.array([42, 7, 1_000_000, 3])  # a slot's cluster id: as slots were given and given again
    fingerprints = np.arange(11, 18, dtype=np.uint64)
    clusters = np.array([3, 42, 5, 1_000_000, -1, 7, 2_000_000])

    restored = FingerprintTable.of(fingerprints, clusters, ids)

    assert [restored.get(fingerprint, now=0) for fingerprint in range(11, 18)] == [
        3,
        0,
        None,
        2,
        None,
        1,
        None,
    ]
    assert FingerprintTable.of(fingerprints, clusters, ids[:0]).get(12, now=0) is None  # no cluster held


def test_a_client_two_billion_queries_along_goes_on_as_one_just_started() -> None:
    # Query sequences are int32 columns: rebased before they overflow, nothing of the order is lost.
    observations = distinct_observations(MAX_CLUSTERS + 60)
    repeats = [observations[index] for index in range(len(observations) - 1, 0, -7)]
    fresh, far_along = RecordClusters(), RecordClusters()
    far_along._sequence = SEQUENCE_LIMIT - 100
    for observation in observations:
        assert far_along.assign(observation) == fresh.assign(observation)
    assert far_along._sequence < SEQUENCE_LIMIT - 100
    assert [far_along.assign(o) for o in repeats] == [fresh.assign(o) for o in repeats]

    stored = fresh.state()
    stored["sequence"] += SEQUENCE_LIMIT  # stored before sequences were int32
    stored["touched_at"] = stored["touched_at"] + np.int64(SEQUENCE_LIMIT)
    representatives = stored["representatives"]
    representatives["exact_touched"] = representatives["exact_touched"] + np.int64(SEQUENCE_LIMIT)
    restored = RecordClusters.from_state(stored)
    assert [restored.assign(o) for o in repeats] == [fresh.assign(o) for o in repeats]


def test_a_client_restored_past_its_bounds_goes_on_exactly_as_one_that_never_stopped() -> None:
    observations = distinct_observations(MAX_FINGERPRINTS + 300)
    # Repeats and near copies of records from well back, some still remembered and some dropped.
    repeats = [observations[index] for index in range(len(observations) - 1, 0, -97)]
    original = RecordClusters()
    for observation in observations:
        original.assign(observation)

    restored = RecordClusters.from_state(original.state())
    assert state_bytes.dumps(restored.state()) == state_bytes.dumps(original.state())
    assert [restored.assign(o) for o in repeats] == [original.assign(o) for o in repeats]


def test_a_client_stored_with_its_labels_spelled_out_tells_flips_as_one_that_never_stopped() -> None:
    tracker, stream, row = warmed_tracker(), Stream("walker"), record()
    labels = ["cat", "cat", "dog", "dog", "cat", "cat"]
    observations = tracker.observe(
        [stream.query(row + 0.001 * step, label=labels[step]) for step in range(6)]
    )
    original = RecordClusters()
    for observation in observations[:3]:
        original.assign(observation)

    stored = original.state()
    assert stored["labels"].tolist() == [label_code("dog")]
    reference = [original.assign(observation) for observation in observations[3:]]
    assert [match.label_flip for match in reference] == [False, True, False]
    restored = RecordClusters.from_state(stored | {"labels": ["dog"]})  # as stored before label codes
    assert [restored.assign(observation) for observation in observations[3:]] == reference


def test_a_state_holding_codes_labels_and_nulls_together_reads_each_as_its_code() -> None:
    tracker, stream, clusters = warmed_tracker(), Stream("mixed"), RecordClusters()
    for observation in tracker.observe([stream.query(record()) for _ in range(3)]):
        clusters.assign(observation)
    stored = clusters.state()
    assert len(stored["labels"]) == 3

    # A version keeping labels wrote one back beside codes, in a state stored as JSON (a rolling upgrade).
    restored = RecordClusters.from_state(stored | {"labels": [label_code("cat"), "dog", None]})

    assert restored.state()["labels"].tolist() == [label_code("cat"), label_code("dog"), NO_LABEL]
    with pytest.raises(ValueError, match="out of range"):
        RecordClusters.from_state(stored | {"labels": [2**32, None, None]})
    with pytest.raises(ValueError, match="one label a cluster"):
        RecordClusters.from_state(stored | {"labels": [None, None]})


def test_a_stored_client_with_a_number_out_of_range_is_unreadable_not_a_crash() -> None:
    tracker, stream, client = warmed_tracker(), Stream("corrupt"), ClientFeatures()
    for observation in tracker.observe([stream.query(record()) for _ in range(3)]):
        client.update(observation)
    state = client.state()
    fingerprints = state["clusters"]["fingerprints"]
    # As stored as JSON: a cluster id no int64 holds.
    state["clusters"]["fingerprints"] = [[int(fingerprints["values"][0]), 2**63]]

    with pytest.raises(ValueError, match="not a stored client state"):
        ClientFeatures.from_bytes(orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY))


def test_a_label_code_is_never_that_of_no_label() -> None:
    assert label_code(None) == NO_LABEL
    assert all(label_code(label) != NO_LABEL for label in ("", "0", "cat", *map(str, range(10_000))))
