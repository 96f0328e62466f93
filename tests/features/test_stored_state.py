"""What the tracker hands to storage and takes back: the clients changed since their state was stored (evicted
ones included), restored clients going on exactly, and the input scales learned online."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from detector.features import state_bytes
from detector.features.client import ClientFeatures, FeatureTracker
from detector.features.embedding import WARMUP_QUERIES, ModelScale, QueryEmbedder, pack
from tests.streams import Stream, augmentation_probe, harvest, record, warmed_tracker


def test_a_client_read_back_from_its_bytes_goes_on_exactly_as_the_original() -> None:
    probe = augmentation_probe(Stream("prober"))
    tracker = warmed_tracker()
    tracker.update(probe[:50])
    original = tracker.get(("m", "prober"))
    assert original is not None
    restored = ClientFeatures.from_bytes(original.to_bytes())
    assert restored.snapshot() == original.snapshot()
    # Both take the rest of the stream: the same observations, the same values after it.
    for observation in tracker.observe(probe[50:]):
        original.update(observation)
        restored.update(observation)
    assert restored.snapshot() == original.snapshot() and restored.evidence == original.evidence
    with pytest.raises(ValueError, match="not a stored client state"):
        ClientFeatures.from_bytes(b"not json")


def stored_as_json(client: ClientFeatures) -> bytes:
    """`client` as states were stored before `state_bytes`: JSON, the clusters' columns as decimal lists or
    base64 text (`pack`), fingerprints as pairs, label codes with null for none, and no runs."""
    state = client.state()
    clusters, kept = state["clusters"], state["clusters"]["representatives"]
    del clusters["runs"]
    invariants, last_row = kept["exact_invariants"], clusters["last_row"]
    fingerprints = clusters["fingerprints"]
    clusters |= {
        "ids": clusters["ids"].tolist(),
        "representatives": {
            "codes": pack(kept["codes"], "<i1"),
            "scales": pack(kept["scales"]),
            "exact_slots": kept["exact_slots"].tolist(),
            "exact_points": pack(kept["exact_points"]),
            "exact_invariants": None if invariants is None else pack(invariants),
            "exact_touched": kept["exact_touched"].tolist(),
        },
        "labels": [code or None for code in clusters["labels"].tolist()],
        "sizes": clusters["sizes"].tolist(),
        "touched_at": clusters["touched_at"].tolist(),
        "fingerprints": [
            [fingerprint, cluster]
            for fingerprint, cluster in zip(
                fingerprints["values"].tolist(), fingerprints["clusters"].tolist(), strict=True
            )
        ],
        "last_row": None if last_row is None else pack(last_row),
    }
    return orjson.dumps(state)


def test_a_client_stored_as_json_before_goes_on_exactly_as_the_original() -> None:
    tracker = warmed_tracker()
    probe = augmentation_probe(Stream("prober"))
    tracker.update(probe[:50])  # in the sixth record's burst
    original = tracker.get(("m", "prober"))
    assert original is not None
    restored = ClientFeatures.from_bytes(stored_as_json(original))
    # Runs were not kept then: they come back from the clusters' sizes and recency, and count no burst twice.
    assert restored.to_bytes() == original.to_bytes()
    for observation in tracker.observe(probe[50:]):
        assert restored.update(observation) == original.update(observation)
    assert restored.to_bytes() == original.to_bytes() and restored.snapshot() == original.snapshot()


def probed_client() -> ClientFeatures:
    """A client 50 queries into an augmentation probe."""
    tracker = warmed_tracker()
    tracker.update(augmentation_probe(Stream("prober"))[:50])
    client = tracker.get(("m", "prober"))
    assert client is not None
    return client


def test_a_state_a_newer_version_stored_restores_what_this_version_knows() -> None:
    original = probed_client()
    newer = original.state()
    newer["features"]["probing"]["a_counter_to_come"] = 3
    newer["features"]["a_feature_to_come"] = {"count": 1}
    assert ClientFeatures.from_state(newer).to_bytes() == original.to_bytes()


def test_a_state_an_older_version_stored_restores_with_what_it_lacks_started_anew() -> None:
    original = probed_client()
    older = original.state()
    del older["features"]["probing"]["peak_recent_bursts"], older["features"]["similarity"]
    restored = ClientFeatures.from_state(older).snapshot()
    kept = original.snapshot()
    assert kept["probing.peak_recent_bursts"] > 0 and restored["probing.peak_recent_bursts"] == 0
    assert kept["similarity.variant_share"] > 0 and restored["similarity.variant_share"] == 0
    assert {name: value for name, value in restored.items() if not name.startswith("similarity.")} == {
        name: value for name, value in kept.items() if not name.startswith("similarity.")
    } | {"probing.peak_recent_bursts": 0}


def _exact_slots(state: dict[str, Any], slots: list[int]) -> None:
    state["clusters"]["representatives"]["exact_slots"] = np.array(slots, dtype=np.int16)


def _clusters(state: dict[str, Any], count: int) -> None:
    for column in ("ids", "labels", "sizes", "touched_at"):
        state["clusters"][column] = np.zeros(count, dtype=state["clusters"][column].dtype)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda state: _exact_slots(state, [0, 10_000]),  # a slot it does not hold
        lambda state: _exact_slots(state, [1, 1]),  # two rows of one slot
        lambda state: _clusters(state, 100_000),  # more clusters than are kept: memory on demand
        lambda state: state["clusters"].update(fingerprints=[[]]),  # as JSON, not pairs
        lambda state: state["clusters"].update(runs=np.ones(2, dtype=np.uint8)),  # not one run a cluster
        lambda state: state["clusters"].update(runs=state["clusters"]["runs"] + 0.5),  # not counts
        lambda state: state["clusters"].update(
            runs=state["clusters"]["runs"].astype(int) + 300
        ),  # > RUN_LIMIT
        lambda state: state["clusters"].update(fingerprints={"values": np.zeros(3), "clusters": np.zeros(2)}),
        lambda state: state["features"]["volume"].update(queries=np.zeros(2)),  # a counter that is not one
        lambda state: state.update(client_ip=7),
        lambda state: state["clusters"]["representatives"].update(  # invariant views of another width
            invariant_codes=np.zeros((3, 5), dtype=np.int8), invariant_scales=np.ones(3, dtype=np.float32)
        ),
        lambda state: state["clusters"]["representatives"]["scales"].__setitem__(0, np.nan),  # no distance
        lambda state: state["clusters"]["representatives"].update(scales=np.ones(1, dtype=np.float32)),
    ],
)
def test_a_stored_state_that_no_client_could_have_is_unreadable_not_a_crash(corrupt: Any) -> None:
    state = probed_client().state()
    corrupt(state)
    with pytest.raises(ValueError, match="not a stored client state"):
        ClientFeatures.from_bytes(state_bytes.dumps(state))


def test_the_tracker_hands_over_each_change_once_evicted_clients_included() -> None:
    tracker = FeatureTracker(warmed_tracker().embedder, max_clients=2)
    streams = [Stream(f"c{index}") for index in range(3)]
    tracker.update([stream.query(record()) for stream in streams])  # c0 evicted by c2
    assert len(tracker) == 2 and tracker.evicted == 1
    changed = tracker.changed()
    assert sorted(changed) == [("m", "c0"), ("m", "c1"), ("m", "c2")]
    # An evicted client coming back before its state was stored is taken back from where it was kept.
    tracker.update([streams[0].query(record())])
    back = tracker.get(("m", "c0"))
    assert back is not None and back.queries == 2
    tracker.stored(tracker.changed().keys())
    assert tracker.changed() == {}
    tracker.update([streams[1].query(record())])
    assert list(tracker.changed()) == [("m", "c1")]


def test_missing_clients_are_restored_and_unreadable_states_start_afresh() -> None:
    source = warmed_tracker()
    source.update(harvest(Stream("harvester"), records=40))
    harvester = source.get(("m", "harvester"))
    assert harvester is not None
    tracker = FeatureTracker(source.embedder)
    keys = {("m", "harvester"), ("m", "broken"), ("m", "new")}
    assert tracker.missing(keys) == keys
    unreadable = tracker.restore({("m", "harvester"): harvester.to_bytes(), ("m", "broken"): b"\x00"})
    assert unreadable == [("m", "broken")]
    assert tracker.missing(keys) == {("m", "broken"), ("m", "new")}
    restored = tracker.get(("m", "harvester"))
    assert restored is not None and restored.snapshot() == harvester.snapshot()
    assert tracker.changed() == {}  # as stored: nothing to write back
    tracker.clear()
    assert tracker.missing(keys) == keys and len(tracker) == 0


def test_a_learned_input_scale_is_stored_while_it_learns_and_adopted_back() -> None:
    embedder = QueryEmbedder()
    stream = Stream("user")
    embedder.observe([stream.query(record()) for _ in range(10)])
    learned = embedder.learned()
    assert list(learned) == ["m"] and not learned["m"].frozen
    stored = {"m": learned["m"].to_bytes()}
    embedder.stored(learned)
    assert embedder.learned() == {}

    # Learned further, never stored (those records come again): adopting the stored scale goes back to it.
    embedder.observe([stream.query(record()) for _ in range(10)])
    embedder.adopt(stored)
    assert embedder.scales["m"].count == 10 and embedder.learned() == {}
    # A fresh process ends where one that never stopped ends.
    rows = [stream.query(record()) for _ in range(WARMUP_QUERIES)]
    unbroken = QueryEmbedder()
    first = QueryEmbedder()
    first.observe(rows[:100])
    second = QueryEmbedder()
    second.adopt({"m": first.scales["m"].to_bytes()})
    unbroken.observe(rows)
    second.observe(rows[100:])
    assert second.scales["m"].frozen and np.array_equal(second.scales["m"].mean, unbroken.scales["m"].mean)
    # A scale given by the trained model is never replaced.
    given = QueryEmbedder({"m": ModelScale.fixed(np.zeros(30), np.ones(30))})
    given.adopt(stored)
    assert given.scales["m"].count == WARMUP_QUERIES and not given.scales["m"].mean.any()
    with pytest.raises(ValueError, match="not a stored input scale"):
        ModelScale.from_bytes(b"{}")


def test_only_idle_clients_whose_state_is_stored_are_released() -> None:
    tracker = FeatureTracker(warmed_tracker().embedder)
    old, unstored, recent = Stream("old"), Stream("unstored"), Stream("recent")
    recent.clock += 3600.0
    tracker.update([old.query(record()), unstored.query(record())])
    tracker.stored([("m", "old")])  # "unstored" changed since: releasing it would lose that change
    tracker.update([recent.query(record())])
    tracker.stored([("m", "recent")])

    assert tracker.release_idle(horizon=old.clock + 1.0) == 1
    assert tracker.get(("m", "old")) is None and tracker.released == 1
    assert tracker.get(("m", "unstored")) is not None and tracker.get(("m", "recent")) is not None
    assert tracker.missing([("m", "old")]) == {("m", "old")}  # to be restored from storage when it returns
    tracker.stored([("m", "unstored")])
    assert tracker.release_idle(horizon=recent.clock) == 1  # the recent one stops the look
    assert len(tracker) == 1
