"""State shared by the members of a consumer group, on SQLite and PostgreSQL. Partition leases: a claim
raises the epoch and reads the stored positions; a commit under an older epoch stores nothing; a claim and a
commit of the same partition are serialised. Coordination pools: two commits sharing one are serialised."""

from __future__ import annotations

import threading
import time

import pytest

from detector.storage import Checkpoint, DurableBatch, Fenced, SeenEvent, Store, StoredClientState

from .conftest import START

GROUP = "mia-detector"
P0, P1 = ("logs", 0), ("logs", 1)


def batch(offset: int, state: bytes) -> DurableBatch:
    """A commit of partition 0 up to `offset`, with one client state and one seen event."""
    return DurableBatch(
        seen_events=[SeenEvent(f"event-{offset}", START, b"d")],
        checkpoints=[Checkpoint(GROUP, *P0, offset)],
        client_states=[StoredClientState("fraud-v1", "client-a", state, START)],
    )


def commit(store: Store, epochs: dict[tuple[str, int], int], offset: int, state: bytes) -> None:
    with store.transaction() as transaction:
        transaction.hold_leases(GROUP, epochs)
        transaction.write(batch(offset, state))


def test_each_claim_raises_the_epoch_and_reads_the_stored_positions(store: Store) -> None:
    first = store.claim_partitions(GROUP, [P0, P1], "host-a:1")
    assert first.epochs == {P0: 1, P1: 1} and first.positions == {}
    commit(store, first.epochs, 120, b"a")
    second = store.claim_partitions(GROUP, [P0], "host-b:2")
    assert second.epochs == {P0: 2}
    assert second.positions == {P0: 120}
    # Another group's leases are its own.
    assert store.claim_partitions("other-group", [P0], "host-c:3").epochs == {P0: 1}


def test_a_commit_under_an_older_lease_stores_nothing_and_names_the_new_owner(store: Store) -> None:
    old = store.claim_partitions(GROUP, [P0, P1], "host-a:1")
    commit(store, old.epochs, 100, b"old-owner-1")
    new = store.claim_partitions(GROUP, [P0], "host-b:2")
    commit(store, new.epochs, 200, b"new-owner")

    with pytest.raises(Fenced) as refused:
        commit(store, old.epochs, 150, b"old-owner-2")
    assert "logs/0 (epoch 1, now 2, claimed by host-b:2)" in str(refused.value)
    assert "logs/1" not in str(refused.value)  # still the old owner's
    assert store.checkpoints(GROUP) == {P0: 200}
    assert store.client_states([("fraud-v1", "client-a")]) == {("fraud-v1", "client-a"): b"new-owner"}
    assert store.count_seen_events() == 2


def test_a_partition_never_claimed_is_refused(store: Store) -> None:
    with pytest.raises(Fenced, match="logs/0 \\(epoch 0, never claimed\\)"):
        commit(store, {P0: 0}, 10, b"x")
    assert store.checkpoints(GROUP) == {}


def test_a_claim_waits_for_a_commit_in_flight_and_reads_its_positions(store: Store) -> None:
    # The old owner's commit holds the lease when the new owner claims the partition: the claim must wait
    # for it, then read the positions it stored (not the ones before), or the new owner would read again
    # from older positions while the old owner's states say those records were counted.
    old = store.claim_partitions(GROUP, [P0], "host-a:1")
    commit(store, old.epochs, 100, b"first")
    claimed: list[dict[tuple[str, int], int]] = []
    claimer = threading.Thread(
        target=lambda: claimed.append(store.claim_partitions(GROUP, [P0], "host-b:2").positions)
    )
    with store.transaction() as transaction:
        transaction.hold_leases(GROUP, old.epochs)
        transaction.write(batch(180, b"second"))
        claimer.start()
        time.sleep(0.5)  # the claim is under way, and must be blocked by this transaction's lock
        assert not claimed, "the claim went ahead of a commit holding the lease"
    claimer.join(30)
    assert claimed == [{P0: 180}]


# -- coordination pools, shared the same way ---------------------------------------------------------------

POOL = ("fraud-v1", "198.51.100.0/24")


def test_pools_read_back_what_was_written_and_not_the_rows_made_to_lock(store: Store) -> None:
    with store.transaction() as transaction:
        assert transaction.read_pools([POOL, ("fraud-v1", "203.0.113.0/24")]) == {}
        transaction.write_pools({POOL: b"pool-1"})
    assert store.pools([POOL, ("fraud-v1", "203.0.113.0/24")]) == {POOL: b"pool-1"}


def test_a_pool_read_in_a_commit_waits_for_another_commit_that_holds_it(store: Store) -> None:
    with store.transaction() as transaction:
        transaction.write_pools({POOL: b"first"})
    read: list[dict[tuple[str, str], bytes]] = []

    def other_member() -> None:
        with store.transaction() as transaction:
            read.append(transaction.read_pools([POOL]))

    reader = threading.Thread(target=other_member)
    with store.transaction() as transaction:
        transaction.read_pools([POOL])
        transaction.write_pools({POOL: b"second"})
        reader.start()
        time.sleep(0.5)  # the other member's read is under way, and must wait for this transaction
        assert not read, "a pool was read while another commit held it"
    reader.join(30)
    assert read == [{POOL: b"second"}]
