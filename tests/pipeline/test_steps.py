"""The Detect step: every detection is taken on a query, so batching changes none of them."""

from __future__ import annotations

from typing import Any

from detector.domain import AlertKind, Query
from detector.features.client import ClientFeatures, FeatureTracker, TrainingIndexes
from detector.features.embedding import QueryEmbedder
from detector.pipeline.steps import SIGNAL_SPACING, Batch, DetectStep
from detector.scoring.coordination import CoordinationTracker
from detector.scoring.detector import Detector
from detector.scoring.model import ScoringModel
from tests.scoring.test_scoring import RULES, baseline_trajectories
from tests.streams import SetIndex, Stream, augmentation_probe, boundary_walk, harvest, record

MODEL = ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={})
MEMBERS = [record() for _ in range(60)]


def interleaved_traffic() -> list[Query]:
    """Attackers of every kind and benign clients, their queries merged in event-time order."""
    streams = {
        "warmup": [Stream("warmup").query(record()) for _ in range(300)],
        "prober": augmentation_probe(Stream("prober")),
        "walker": boundary_walk(Stream("walker")),
        "harvester": harvest(Stream("harvester"), records=500),
        "candidates": [Stream("candidates", ip="198.51.100.9").query(row, gap=20) for row in MEMBERS[:40]],
        "steady": [Stream("steady").query(record(), gap=30) for _ in range(150)],
    }
    return sorted((q for queries in streams.values() for q in queries), key=lambda q: q.timestamp)


TRAFFIC = interleaved_traffic()


def detect_step() -> DetectStep:
    tracker = FeatureTracker(QueryEmbedder(), TrainingIndexes(default=SetIndex(MEMBERS)))
    detector = Detector(RULES, MODEL)
    return DetectStep(tracker, detector, CoordinationTracker(threshold=40), revisit_seconds=450.0)


def detections_in_batches(size: int) -> list[tuple[Any, ...]]:
    """Every detection of the traffic processed `size` queries a batch, each batch then committed."""
    step = detect_step()
    found = []
    for start in range(0, len(TRAFFIC), size):
        chunk = TRAFFIC[start : start + size]
        batch = step.process(Batch(records=[], fresh=[(None, [query]) for query in chunk]))  # type: ignore[misc]
        found += batch.detections + step.judge(chunk[-1].timestamp)
    return sorted(
        (d.dedup_key, d.fired, d.detected_at, d.detected_after_queries, d.score, d.last_seen) for d in found
    )


def test_the_same_detections_at_the_same_queries_however_the_stream_is_batched() -> None:
    one_by_one = detections_in_batches(1)

    kinds = {(key.rsplit("|", 1)[1], fired) for key, fired, *_ in one_by_one}
    assert kinds >= {
        (AlertKind.AUGMENTATION_PROBING, True),
        (AlertKind.BOUNDARY_PROBING, True),
        (AlertKind.CONFIDENCE_HARVESTING, True),
        (AlertKind.TRAINING_SET_TARGETING, True),
        (AlertKind.ANOMALOUS_SESSION, False),  # the forest judged moments too, in the hold band
    }
    for size in (7, 250, len(TRAFFIC)):
        assert detections_in_batches(size) == one_by_one, size


def test_an_attack_is_detected_on_the_query_that_crossed_not_at_the_end_of_its_batch() -> None:
    step = detect_step()
    batch = step.process(Batch(records=[], fresh=[(None, [query]) for query in TRAFFIC]))  # type: ignore[misc]
    [first] = [
        d
        for d in batch.detections
        if d.client_id == "prober" and d.fired and d.kind is AlertKind.AUGMENTATION_PROBING
    ][:1]
    prober = [query for query in TRAFFIC if query.client_id == "prober"]
    assert first.detected_after_queries < len(prober)
    assert first.detected_at == prober[first.detected_after_queries - 1].timestamp


def test_a_client_is_judged_on_a_share_of_new_traffic_or_after_the_revisit_interval() -> None:
    step = detect_step()
    client = ClientFeatures()
    client.queries, client.evaluated_at, client.evaluated_time = 1000, 990, 5000.0
    assert not step.due(client, 5000.0 + 449.0)  # 10 new queries: under 1000 // 32
    assert step.due(client, 5000.0 + 450.0)  # but judged at least every revisit interval
    client.queries = 990 + 1000 // 32
    assert step.due(client, 5001.0)
    young = ClientFeatures()
    young.queries, young.evaluated_at = 5, 4
    assert step.due(young, 0.0)  # every query while young
    # A signal (a burst, a flip, a round, a training record) is judged a few queries after the last judgement.
    client.queries, client.signalled = 990 + SIGNAL_SPACING - 1, True
    assert not step.due(client, 5001.0)
    client.queries = 990 + SIGNAL_SPACING
    assert step.due(client, 5001.0)
    client.signalled = False
    assert not step.due(client, 5001.0)


def test_a_key_with_a_long_history_is_caught_within_a_few_queries_of_its_attack() -> None:
    step = detect_step()
    stream = Stream("compromised")
    history = [stream.query(record(), gap=2.0) for _ in range(20_000)]
    probe = augmentation_probe(stream, records=12, variants=8)  # 12 records, each with 8 copies back to back
    found = []
    for start in range(0, len(history + probe), 500):
        chunk = (history + probe)[start : start + 500]
        found += step.process(Batch(records=[], fresh=[(None, [query]) for query in chunk])).detections  # type: ignore[misc]
    [first] = [d for d in found if d.fired and d.kind is AlertKind.AUGMENTATION_PROBING][:1]
    # The burst that makes six is the sixth record's: judged at most SIGNAL_SPACING queries later, where
    # 3% of a 20,000-query history (625 queries) would come after the whole probe (108 queries).
    sixth_burst = len(history) + 5 * 9 + 3
    assert sixth_burst <= first.detected_after_queries <= sixth_burst + SIGNAL_SPACING


def test_a_signal_just_after_a_judgement_is_judged_a_few_queries_later_whatever_follows() -> None:
    step = detect_step()
    stream = Stream("compromised")
    history = [stream.query(record(), gap=2.0) for _ in range(20_000)]
    # Bursts of a record and two copies: one completes every third query, so the sixth completes a few
    # queries after the judgement on an earlier one, and ordinary queries follow it.
    probe = augmentation_probe(stream, records=6, variants=2)
    after = [stream.query(record(), gap=2.0) for _ in range(300)]
    found = []
    for start in range(0, len(history + probe + after), 500):
        chunk = (history + probe + after)[start : start + 500]
        found += step.process(Batch(records=[], fresh=[(None, [query]) for query in chunk])).detections  # type: ignore[misc]
    [first] = [d for d in found if d.fired and d.kind is AlertKind.AUGMENTATION_PROBING][:1]
    sixth_burst = len(history) + 5 * 3 + 3
    assert sixth_burst <= first.detected_after_queries <= sixth_burst + SIGNAL_SPACING
