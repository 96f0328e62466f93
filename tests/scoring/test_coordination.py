"""Sybil keys that split one attack: pooled training-set hits raise one alert naming all of them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson
import pytest

from detector.domain import AlertKind, Detection, Exposure
from detector.features.client import ClientFeatures, TrainingIndexes
from detector.features.exposure import ExposureCounts
from detector.scoring.coordination import WINDOW_SECONDS, CoordinationTracker, PoolState
from tests.streams import SetIndex, Stream, record, warmed_tracker


def test_sybils_below_every_threshold_are_alerted_together_and_only_once() -> None:
    members = [record() for _ in range(40)]
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members))
    coordination = CoordinationTracker(threshold=12)
    sybils = [f"sybil-{index}" for index in range(4)]
    for index, client_id in enumerate(sybils):
        stream = Stream(client_id, ip=f"198.51.100.{10 + index}")  # one campaign, one network
        share = members[index * 3 : index * 3 + 3]  # each key holds a disjoint share of the candidates
        tracker.update([stream.query(row) for row in share] + [stream.query(record()) for _ in range(20)])
    benign = Stream("benign", ip="198.51.100.200")
    tracker.update([benign.query(record()) for _ in range(50)])
    elsewhere = Stream("other-network", ip="203.0.113.5")
    tracker.update([elsewhere.query(row) for row in members[30:33]])
    detections = []
    for client_id in ["benign", "other-network", *sybils, *sybils]:
        client = tracker.get(("m", client_id))
        assert client is not None
        detections += coordination.observe(("m", client_id), client, client.snapshot(), client.last_seen)

    # Raised when the last sybil took the pool to the threshold, and only then (reported once).
    [detection] = detections
    assert detection.kind is AlertKind.COORDINATED_CLIENTS
    assert detection.client_ids == tuple(sybils)  # not the benign neighbour, not the other network
    assert detection.score == 12 and detection.threshold == 12
    assert len(detection.evidence) == 12
    last = tracker.get(("m", sybils[-1]))
    assert last is not None and detection.detected_at == last.last_seen
    # What the campaign was given: each key 23 distinct records with probabilities, 3 of them training ones.
    assert detection.exposure == Exposure(probability_records=4 * 23, training_records=4 * 3)


def test_one_key_alone_or_allow_listed_keys_do_not_make_a_campaign() -> None:
    """The allow-listed job shares the lonely key's network; without it, one key is not a campaign."""
    members = [record() for _ in range(20)]
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members))
    coordination = CoordinationTracker(threshold=5, allowed=frozenset({"nightly-job"}))
    for client_id, share in (("nightly-job", members[:4]), ("lonely", members[4:8])):
        stream = Stream(client_id, ip="192.0.2.3" if client_id == "lonely" else "192.0.2.4")
        tracker.update([stream.query(row) for row in share])
        client = tracker.get(("m", client_id))
        assert client is not None
        assert coordination.observe(("m", client_id), client, client.snapshot(), client.last_seen) == []


def participant(
    client_id: str, last_seen: float, ip: str = "198.51.100.7", exposure: Exposure | None = None
) -> ClientFeatures:
    client = ClientFeatures(exposure=ExposureCounts(**exposure.model_dump()) if exposure else None)
    client.client_ip, client.first_seen, client.last_seen, client.queries = ip, last_seen, last_seen, 10
    return client


HITS = {"training.distinct_hits": 1.0, "training.exact_hit_rate": 0.1}


def test_a_flood_of_keys_with_a_hit_each_is_held_within_its_bound() -> None:
    coordination = CoordinationTracker(threshold=1_000_000, max_participants=100)
    for index in range(10_000):
        # Every key from its own /24: no pool ever forms, yet each would be kept without the bound.
        ip = f"10.{index // 256 % 256}.{index % 256}.1"
        key, at = ("m", f"k{index}"), 1000.0 + index
        assert coordination.observe(key, participant(key[1], at, ip), HITS, at) == []
    assert len(coordination) == 100
    # The most recent keys are the ones kept; a window later none is.
    coordination.forget(watermark=11_000.0)
    assert len(coordination) == 100
    coordination.forget(watermark=11_000.0 + WINDOW_SECONDS)
    assert len(coordination) == 0


def test_reported_keys_are_forgotten_a_window_after_they_went_quiet() -> None:
    coordination = CoordinationTracker(threshold=2)
    assert coordination.observe(("m", "a"), participant("a", 1000.0), HITS, 1000.0) == []
    [detection] = coordination.observe(("m", "b"), participant("b", 1000.0), HITS, 1000.0)
    assert detection.client_ids == ("a", "b") and len(coordination) == 2  # remembered as reported
    # Still active: not pooled again, and remembered as long as it goes on.
    later = 1000.0 + WINDOW_SECONDS
    assert coordination.observe(("m", "a"), participant("a", later), HITS, later) == []
    coordination.forget(watermark=later + 1)
    assert len(coordination) == 1  # "b" went quiet a window ago
    coordination.forget(watermark=later + 1 + WINDOW_SECONDS)
    assert len(coordination) == 0
    # A reported key quiet for a window is pooled again when it comes back.
    back = later + 2 * WINDOW_SECONDS
    assert coordination.observe(("m", "a"), participant("a", back), HITS, back) == []
    [again] = coordination.observe(("m", "c"), participant("c", back), HITS, back)
    assert again.client_ids == ("a", "c")


# -- pools shared between the members of a consumer group ----------------------------------------------------


class SharedDict:
    """The database's pools as the members see them through their commits (one at a time)."""

    def __init__(self) -> None:
        self.pools: dict[tuple[str, str], bytes] = {}

    def read_pools(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        return {key: self.pools[key] for key in keys if key in self.pools}

    def write_pools(self, pools: Mapping[tuple[str, str], bytes]) -> None:
        self.pools.update(pools)


def commit(member: CoordinationTracker, shared: SharedDict) -> list[Detection]:
    """One member's commit: the exchange, then the transaction is durable."""
    found = member.exchange(shared)
    member.persisted()
    return found


def hits(count: int) -> dict[str, float]:
    return {"training.distinct_hits": float(count), "training.exact_hit_rate": 0.1}


def test_a_campaign_split_over_two_members_is_alerted_once_when_together_it_reaches_the_threshold() -> None:
    shared, first, second = SharedDict(), CoordinationTracker(threshold=8), CoordinationTracker(threshold=8)
    # Each member holds two keys of the campaign (4 hits): below the threshold on either alone.
    for member, keys in ((first, ("s0", "s2")), (second, ("s1", "s3"))):
        for index, client_id in enumerate(keys):
            at = 1000.0 + index
            assert member.observe(("m", client_id), participant(client_id, at), hits(2), at) == []
    assert commit(first, shared) == []  # the pool stored holds s0 and s2

    [detection] = commit(second, shared)  # merged: 8 hits
    assert detection.client_ids == ("s0", "s1", "s2", "s3") and detection.score == 8
    assert detection.detected_at == 1001.0  # the latest query of the keys pooled

    # The first member learns that its keys were reported: no second alert for them, now or later.
    assert commit(first, shared) == []
    assert first.observe(("m", "s0"), participant("s0", 1100.0), hits(3), 1100.0) == []
    assert commit(first, shared) == []


def test_when_two_members_detect_one_pool_at_once_both_detections_name_its_one_alert() -> None:
    shared, first, second = SharedDict(), CoordinationTracker(threshold=6), CoordinationTracker(threshold=6)
    for member, client_id in ((first, "a"), (second, "b")):
        member.observe(("m", client_id), participant(client_id, 1000.0), hits(2), 1000.0)
        assert commit(member, shared) == []
    # Between two commits, each member's own keys take the pool it knows over the threshold: the second
    # member's knows "a" (merged at its commit), the first member's does not know "b".
    [by_second] = second.observe(("m", "c"), participant("c", 1010.0), hits(2), 1010.0)
    [by_first] = first.observe(("m", "d"), participant("d", 1011.0), hits(4), 1011.0)
    assert by_second.client_ids == ("a", "b", "c") and by_first.client_ids == ("a", "d")
    assert by_first.dedup_key == by_second.dedup_key == "m|group:198.51.100.0/24|coordinated_clients"
    assert commit(second, shared) == [] and commit(first, shared) == []  # nothing withdrawn, nothing new
    # Every key of both stays reported: a later key alone is below the threshold.
    assert first.observe(("m", "e"), participant("e", 1020.0), hits(2), 1020.0) == []
    combined = by_second.combined(by_first)
    assert combined.client_ids == ("a", "b", "c", "d")


def test_a_restarted_member_loads_the_stored_pool_before_judging_a_query() -> None:
    shared, before = SharedDict(), CoordinationTracker(threshold=4)
    before.observe(("m", "a"), participant("a", 1000.0), hits(2), 1000.0)
    commit(before, shared)

    after = CoordinationTracker(threshold=4)  # a new process: nothing in memory
    key = ("m", "198.51.100.0/24")
    assert after.unknown({key}) == [key]
    after.load(shared.read_pools([key]))
    assert after.unknown({key}) == []
    [detection] = after.observe(("m", "b"), participant("b", 1005.0), hits(2), 1005.0)
    assert detection.client_ids == ("a", "b") and detection.detected_at == 1005.0


class FailingOnce(SharedDict):
    """A database whose first write of the pools fails (a connection lost inside the commit)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    def write_pools(self, pools: Mapping[tuple[str, str], bytes]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection lost")
        super().write_pools(pools)


def test_what_a_failed_exchange_found_is_returned_by_the_next_one() -> None:
    shared, first, second = FailingOnce(), CoordinationTracker(threshold=4), CoordinationTracker(threshold=4)
    shared.failures = 0
    first.observe(("m", "a"), participant("a", 1000.0), hits(2), 1000.0)
    commit(first, shared)
    second.observe(("m", "b"), participant("b", 1001.0), hits(2), 1001.0)
    shared.failures = 1
    with pytest.raises(ConnectionError):
        second.exchange(shared)  # the merged pool crossed, but nothing was stored
    [detection] = commit(second, shared)  # the retried commit
    assert detection.client_ids == ("a", "b")
    assert commit(second, shared) == []  # returned once


def test_a_key_whose_address_moves_to_another_network_is_in_one_pool() -> None:
    shared, tracker = SharedDict(), CoordinationTracker(threshold=4)
    tracker.observe(("m", "a"), participant("a", 1000.0, ip="198.51.100.7"), hits(1), 1000.0)
    tracker.observe(("m", "a"), participant("a", 1001.0, ip="203.0.113.7"), hits(1), 1001.0)
    assert len(tracker) == 1
    commit(tracker, shared)
    # Reported from one network, then from the other: one report, and forgetting it leaves nothing behind.
    tracker.observe(("m", "b"), participant("b", 1002.0, ip="203.0.113.8"), hits(3), 1002.0)
    tracker.forget(watermark=1002.0 + 2 * WINDOW_SECONDS)
    assert len(tracker) == 0
    tracker.observe(
        ("m", "c"), participant("c", 1002.0 + 2 * WINDOW_SECONDS, ip="198.51.100.9"), hits(1), 1e9
    )
    commit(tracker, shared)  # writes both pools without tripping over a stale report


def test_keys_a_member_lets_go_for_its_own_bound_stay_in_the_stored_pool() -> None:
    shared, wide, narrow = SharedDict(), CoordinationTracker(threshold=100), CoordinationTracker(100, 2)
    for index in range(3):
        client_id = f"w{index}"
        wide.observe(("m", client_id), participant(client_id, 1000.0 + index), hits(1), 1000.0 + index)
    commit(wide, shared)
    narrow.observe(("m", "n"), participant("n", 1010.0), hits(1), 1010.0)
    commit(narrow, shared)  # holds 2 keys of the 4 in memory
    [state] = shared.pools.values()
    assert set(PoolState.from_bytes(state).participants) == {"w0", "w1", "w2", "n"}


def test_two_members_detecting_their_own_keys_of_one_pool_at_once_name_one_alert() -> None:
    shared, first, second = SharedDict(), CoordinationTracker(threshold=6), CoordinationTracker(threshold=6)
    # Between two commits each member pools two keys of one network, and each pair crosses the threshold.
    [by_first] = [
        detection
        for client_id, at in (("x1", 1000.0), ("x2", 1002.0))
        for detection in first.observe(("m", client_id), participant(client_id, at), hits(3), at)
    ]
    [by_second] = [
        detection
        for client_id, at in (("y1", 1001.0), ("y2", 1003.0))
        for detection in second.observe(("m", client_id), participant(client_id, at), hits(3), at)
    ]
    assert by_first.dedup_key == by_second.dedup_key  # the pool's alert
    assert commit(first, shared) == [] and commit(second, shared) == []
    # Its keys stay reported with the wave: not pooled into a detection of their own later.
    assert second.observe(("m", "y1"), participant("y1", 1010.0), hits(4), 1010.0) == []
    assert commit(second, shared) == [] and commit(first, shared) == []

    # A later wave of other keys of the network is alerted on, by either member.
    late = [
        detection
        for client_id, at in (("z1", 1100.0), ("z2", 1101.0))
        for detection in first.observe(("m", client_id), participant(client_id, 1100.0), hits(3), at)
    ]
    assert [detection.client_ids for detection in late] == [("z1", "z2")]
    assert by_first.client_ids == ("x1", "x2") and late[0].dedup_key == by_first.dedup_key


def test_a_campaign_split_over_two_members_is_alerted_with_what_all_its_keys_were_given() -> None:
    shared, first, second = SharedDict(), CoordinationTracker(threshold=8), CoordinationTracker(threshold=8)
    given = {
        "s0": Exposure(probability_records=40, training_records=2, label_only_answers=5, probes=1),
        "s1": Exposure(probability_records=30, training_records=2),
        "s2": Exposure(probability_records=20, training_records=2, probes=7),
        "s3": Exposure(probability_records=10, training_records=2, label_only_answers=1),
    }
    for member, keys in ((first, ("s0", "s2")), (second, ("s1", "s3"))):
        for client_id in keys:
            member.observe(
                ("m", client_id), participant(client_id, 1000.0, exposure=given[client_id]), hits(2), 1000.0
            )
    assert commit(first, shared) == []

    [detection] = commit(second, shared)  # two of its keys known through the stored pool only
    assert detection.exposure == Exposure(
        probability_records=100, training_records=8, label_only_answers=6, probes=8
    )

    # A later wave of the campaign adds what its keys were given to the alert's; the same wave again
    # (a retried commit) changes nothing.
    [wave] = [
        found
        for client_id in ("s4", "s5", "s6", "s7")
        for found in second.observe(
            ("m", client_id), participant(client_id, 1100.0, exposure=given["s1"]), hits(2), 1100.0
        )
    ]
    assert wave.exposure == Exposure(probability_records=120, training_records=8)
    total = detection.combined(wave)
    assert total.exposure == Exposure(
        probability_records=220, training_records=16, label_only_answers=6, probes=8
    )
    assert total.combined(wave).exposure == total.exposure


def test_a_pool_written_with_exposures_keeps_its_participants_for_a_member_of_the_version_before() -> None:
    shared, member = SharedDict(), CoordinationTracker(threshold=8)
    given = Exposure(probability_records=40, training_records=2, label_only_answers=5, probes=1)
    member.observe(("m", "s0"), participant("s0", 1000.0, exposure=given), hits(2), 1000.0)
    commit(member, shared)
    [stored] = shared.pools.values()

    # As the version before read a pool (a rolling upgrade): six fields a participant, the reports.
    document = orjson.loads(stored)
    before = {
        client_id: (hits, rate, queries, first, last, evidence)
        for client_id, (hits, rate, queries, first, last, evidence) in document["participants"].items()
    }
    assert set(before) == {"s0"} and document["reported"] == {}
    assert PoolState.from_bytes(stored).participants["s0"].exposure == (40, 2, 5, 1)


def test_a_pool_stored_without_exposures_is_alerted_with_none_rather_than_an_understatement() -> None:
    member = CoordinationTracker(threshold=4)
    given = Exposure(probability_records=10, training_records=2)
    old = {"participants": {"old": [2, 0.1, 10, 1000.0, 1000.0, ["e1", "e2"]]}, "reported": {}}
    member.load({("m", "198.51.100.0/24"): orjson.dumps(old)})  # as stored before exposures were pooled
    [detection] = member.observe(("m", "new"), participant("new", 1001.0, exposure=given), hits(2), 1001.0)
    assert detection.client_ids == ("new", "old") and detection.exposure is None
