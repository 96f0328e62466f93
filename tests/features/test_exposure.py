"""Exposure accounting: what a client was given, counted per distinct record, whatever the rules think."""

from __future__ import annotations

import numpy as np

from detector.domain import Exposure, Query, Requested
from detector.features.client import ClientFeatures, TrainingIndexes
from detector.features.exposure import answered_with_probabilities
from tests.streams import SetIndex, Stream, augmentation_probe, harvest, record, warmed_tracker


def exposure_after(
    queries: list[Query], training: list[np.ndarray] | None = None
) -> tuple[Exposure, Exposure]:
    """The exposure of the queries' client, and the tracker's total over every client, after the queries."""
    tracker = warmed_tracker()
    if training is not None:
        tracker.training_indexes = TrainingIndexes(default=SetIndex(training))
    before = tracker.exposure.exposure()
    for start in range(0, len(queries), 50):
        tracker.update(queries[start : start + 50])
    client = tracker.get((queries[0].model, queries[0].client_id))
    assert client is not None
    total = tracker.exposure.exposure()
    since = Exposure(
        probability_records=total.probability_records - before.probability_records,
        training_records=total.training_records - before.training_records,
        label_only_answers=total.label_only_answers - before.label_only_answers,
        probes=total.probes - before.probes,
    )
    return client.exposure.exposure(), since


def test_a_harvester_is_exposed_one_record_per_distinct_input_and_training_records_apart() -> None:
    stream = Stream()
    queries = harvest(stream, records=200)
    members = [query.vector for query in queries[:50] if query.vector is not None]
    # Asked again: the same records, no more exposure of records.
    queries += [stream.query(query.vector, probabilities=query.probabilities) for query in queries[:30]]  # type: ignore[arg-type]
    exposure, total = exposure_after(queries, training=members)
    assert exposure == Exposure(probability_records=200, training_records=50, label_only_answers=0, probes=0)
    assert total == exposure  # the tracker's total counts the same, without the client


def test_label_only_probing_is_label_answers_and_probes_not_probability_records() -> None:
    exposure, _ = exposure_after(augmentation_probe(Stream(), records=10, variants=8))
    assert exposure.label_only_answers == 90
    assert exposure.probability_records == 0
    assert 70 <= exposure.probes <= 80  # each record's burst but its first variants' neighbours


def test_the_logged_response_decides_over_what_was_asked() -> None:
    stream = Stream()
    one_label = np.array([1.0], dtype=np.float32)
    vector = np.array([0.6, 0.4], dtype=np.float32)
    assert not answered_with_probabilities(stream.query(record(), probabilities=one_label))
    assert answered_with_probabilities(
        stream.query(record(), requested=Requested.LABEL, probabilities=vector)
    )
    assert answered_with_probabilities(stream.query(record(), requested=Requested.TOP_K))
    assert not answered_with_probabilities(stream.query(record(), requested=Requested.LABEL))


def test_exposure_survives_the_clients_stored_state_and_old_states_start_counting() -> None:
    tracker = warmed_tracker()
    queries = harvest(Stream(), records=40)
    tracker.update(queries)
    client = tracker.get(("m", "c"))
    assert client is not None
    restored = ClientFeatures.from_bytes(client.to_bytes())
    assert restored.exposure == client.exposure

    old = client.state()
    del old["exposure"]
    assert ClientFeatures.from_state(old).exposure.exposure() == Exposure()
