"""Fencing at the commit point: of two pipelines that both believe they own a partition, the one holding the
older lease stores nothing and drops what it held, whichever commits last."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from detector.metrics import Metrics
from detector.pipeline import Pipeline
from detector.service import build_pipeline
from detector.storage import Fenced, Store, open_store
from tests.pipeline.test_chain import raw, record
from tests.support import make_settings

PARTITION = ("logs", 0)
CLIENT = ("credit-risk", "client-a")
GROUP = "detectors"


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    with open_store(make_settings(database_url)) as opened:
        yield opened


def member(store: Store, owner: str) -> tuple[Pipeline, Metrics]:
    """A pipeline that never commits by itself, holding a fresh claim on `PARTITION`."""
    settings = make_settings("sqlite://", commit={"min_records": 1_000_000, "min_interval_seconds": 3600.0})
    metrics = Metrics()
    pipeline = build_pipeline(settings, store, metrics, group_id=GROUP)
    pipeline.claimed(store.claim_partitions(GROUP, [PARTITION], owner).epochs)
    return pipeline, metrics


def test_a_member_whose_partition_was_claimed_stores_nothing_and_drops_what_it_held(store: Store) -> None:
    records = [record(f"event-{index}", offset=index * 2.0, seed=index) for index in range(30)]
    old, old_metrics = member(store, "old:1")
    old.submit(raw(records[:10]))  # read, not stored: then the old member stalls past its session
    new, _ = member(store, "new:2")
    new.submit(raw(records))  # the new owner reads from the stored positions (none): everything
    new.flush()
    stored_state = store.client_states([CLIENT])
    assert store.checkpoints(GROUP) == {PARTITION: 30} and CLIENT in stored_state

    with pytest.raises(Fenced, match="logs/0 \\(epoch 1, now 2, claimed by new:2\\)"):
        old.flush()  # without fencing, this would set the checkpoint back to 10 and the client to 10 queries

    assert store.checkpoints(GROUP) == {PARTITION: 30}
    assert store.client_states([CLIENT]) == stored_state
    assert store.count_seen_events() == 30
    assert old.uncommitted_records == 0 and len(old.detect.tracker) == 0
    assert old_metrics.fenced_commits._value.get() == 1
    # The old member no longer holds any lease: whatever it reads next is refused until it claims again.
    old.submit(raw(records[10:12], first_offset=10))
    with pytest.raises(Fenced, match="logs/0 \\(epoch 0, now 2, claimed by new:2\\)"):
        old.flush()
    assert store.checkpoints(GROUP) == {PARTITION: 30}
