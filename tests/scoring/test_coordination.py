"""Sybil keys that split one attack: pooled training-set hits raise one alert naming all of them."""

from __future__ import annotations

from detector.domain import AlertKind
from detector.features.client import TrainingIndexes
from detector.scoring.coordination import CoordinationTracker
from tests.streams import SetIndex, Stream, record, warmed_tracker


def test_sybils_below_every_threshold_are_alerted_together_and_only_once() -> None:
    members = [record() for _ in range(40)]
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members))
    coordination = CoordinationTracker(threshold=5)
    sybils = [f"sybil-{index}" for index in range(4)]
    for index, client_id in enumerate(sybils):
        stream = Stream(client_id, ip=f"198.51.100.{10 + index}")  # one campaign, one network
        share = members[index * 3 : index * 3 + 3]  # each key holds a disjoint share of the candidates
        tracker.update([stream.query(row) for row in share] + [stream.query(record()) for _ in range(20)])
    benign = Stream("benign", ip="198.51.100.200")
    tracker.update([benign.query(record()) for _ in range(50)])
    elsewhere = Stream("other-network", ip="203.0.113.5")
    tracker.update([elsewhere.query(row) for row in members[30:33]])
    for client_id in [*sybils, "benign", "other-network"]:
        client = tracker.get(("m", client_id))
        assert client is not None
        coordination.observe(("m", client_id), client, client.snapshot())

    [detection] = coordination.detections(watermark=1_764_000_100.0, allowed=set())
    assert detection.kind is AlertKind.COORDINATED_CLIENTS
    assert detection.client_ids == tuple(sybils)  # not the benign neighbour, not the other network
    assert detection.score == 12 and detection.threshold == 5
    assert len(detection.evidence) == 12
    assert coordination.detections(watermark=1_764_000_100.0, allowed=set()) == []  # reported once


def test_one_key_alone_or_allow_listed_keys_do_not_make_a_campaign() -> None:
    """The allow-listed job shares the lonely key's network; without it, one key is not a campaign."""
    members = [record() for _ in range(20)]
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members))
    coordination = CoordinationTracker(threshold=5)
    for client_id, share in (("nightly-job", members[:4]), ("lonely", members[4:8])):
        stream = Stream(client_id, ip="192.0.2.3" if client_id == "lonely" else "192.0.2.4")
        tracker.update([stream.query(row) for row in share])
        client = tracker.get(("m", client_id))
        assert client is not None
        coordination.observe(("m", client_id), client, client.snapshot())
    assert coordination.detections(watermark=1_764_000_100.0, allowed={"nightly-job"}) == []
