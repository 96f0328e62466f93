"""Session windows: gap, maximum duration, eviction, restore, and independence from interleaving."""

from __future__ import annotations

import random

import numpy as np

from detector.domain import Query, Requested, SessionState, SessionStatus
from detector.sessions import SessionTracker


def query(
    client: str, ts: float, *, event: str = "e", row: int = 0, batch: int = 1, proba: bool = True
) -> Query:
    return Query(
        event_id=event,
        row=row,
        batch_size=batch,
        timestamp=ts,
        model="m",
        model_version="1",
        client_id=client,
        client_ip=None,
        user_agent=None,
        vector=np.zeros(3, dtype=np.float32),
        text=None,
        requested=Requested.PROBABILITIES if proba else Requested.LABEL,
        label="0",
        probabilities=None,
    )


def tracker(**overrides: float) -> SessionTracker:
    options = {"gap_seconds": 100.0, "max_duration_seconds": 1000.0, "max_active": 10} | overrides
    return SessionTracker(**options)  # type: ignore[arg-type]


def test_queries_within_the_gap_share_a_session_and_are_counted() -> None:
    sessions = tracker()
    sessions.update(query("a", 0.0, row=0, batch=2))
    sessions.update(query("a", 0.0, row=1, batch=2))
    state = sessions.update(query("a", 50.0, proba=False))
    assert (state.queries, state.requests, state.confidence_queries, state.max_batch_size) == (3, 2, 2, 2)
    assert (state.first_seen, state.last_seen) == (0.0, 50.0)
    assert state.confidence_share == 2 / 3


def test_a_query_after_the_gap_closes_the_session_and_starts_another() -> None:
    sessions = tracker()
    first = sessions.update(query("a", 0.0))
    second = sessions.update(query("a", 101.0))
    assert first.id != second.id
    assert first.status is SessionStatus.CLOSED
    changed = sessions.changed()
    assert [s.id for s in changed] == [first.id, second.id]
    assert [s.id for s in sessions.changed()] == [first.id, second.id]  # pending until persisted
    sessions.persisted()
    assert sessions.changed() == []


def test_changed_sessions_stay_pending_until_persisted() -> None:
    # A failed write must lose nothing: whatever `changed` reported stays reported, and sessions changed
    # meanwhile join it, until the pipeline says the write was durable.
    sessions = tracker(max_active=1)
    sessions.update(query("a", 0.0))
    sessions.update(query("a", 101.0))  # closes the first session of "a"
    sessions.update(query("b", 102.0))  # evicts "a"
    before = {(s.client_id, s.queries, s.status.value) for s in sessions.changed()}
    sessions.update(query("b", 103.0))
    after = {(s.client_id, s.queries, s.status.value) for s in sessions.changed()}
    assert before == {("a", 1, "closed"), ("a", 1, "open"), ("b", 1, "open")}
    assert after == {("a", 1, "closed"), ("a", 1, "open"), ("b", 2, "open")}
    sessions.persisted()
    assert sessions.changed() == []


def test_the_maximum_duration_splits_a_session_that_never_pauses() -> None:
    sessions = tracker(max_duration_seconds=250.0)
    ids = {sessions.update(query("a", float(t))).id for t in range(0, 650, 50)}
    assert len(ids) == 3


def test_out_of_order_queries_widen_the_window() -> None:
    sessions = tracker()
    sessions.update(query("a", 50.0))
    state = sessions.update(query("a", 20.0))
    assert (state.first_seen, state.last_seen, state.queries) == (20.0, 50.0, 2)


def test_memory_is_bounded_and_evicted_sessions_are_reported_for_persisting() -> None:
    sessions = tracker(max_active=3)
    for index in range(5):
        sessions.update(query(f"c{index}", float(index)))
    assert len(sessions) == 3
    assert {s.client_id for s in sessions} == {"c2", "c3", "c4"}
    changed = {s.client_id: s for s in sessions.changed()}
    assert set(changed) == {"c0", "c1", "c2", "c3", "c4"}
    assert changed["c0"].status is SessionStatus.OPEN  # evicted, not closed


def test_an_evicted_session_comes_back_within_the_same_batch() -> None:
    sessions = tracker(max_active=1)
    first = sessions.update(query("a", 0.0))
    sessions.update(query("b", 1.0))
    again = sessions.update(query("a", 2.0))
    assert again.id == first.id and again.queries == 2


def test_restored_sessions_continue_and_idle_closed_ones_reopen_when_their_own_events_say_so() -> None:
    sessions = tracker(gap_seconds=100.0)
    stored = SessionState(id="s1", model="m", client_id="a", first_seen=0.0, last_seen=90.0, queries=4)
    stored.status = SessionStatus.CLOSED  # closed for idleness by the watermark of another partition
    sessions.restore(stored)
    state = sessions.update(query("a", 150.0))
    assert state.id == "s1" and state.queries == 5 and state.status is SessionStatus.OPEN


def test_a_session_closed_as_idle_and_not_persisted_is_the_one_its_client_goes_on_from() -> None:
    # Storage holds an older state of it until the next commit: restoring that would undo what was counted.
    sessions = tracker(gap_seconds=100.0)
    first = sessions.update(query("a", 0.0))
    sessions.update(query("a", 10.0))
    assert sessions.close_idle(watermark=200.0) == 1
    assert sessions.missing({("m", "a"), ("m", "b")}) == {("m", "b")}

    late = sessions.update(query("a", 60.0))  # its partition lagged: within the gap, the session goes on
    assert (late.id, late.queries, late.status) == (first.id, 3, SessionStatus.OPEN)
    assert [(s.id, s.queries) for s in sessions.changed()] == [(first.id, 3)]

    sessions.close_idle(watermark=300.0)
    after = sessions.update(query("a", 400.0))  # beyond the gap: a new session, the closed one kept
    assert after.id != first.id
    assert [(s.id, s.queries, s.status.value) for s in sessions.changed()] == [
        (first.id, 3, "closed"),
        (after.id, 1, "open"),
    ]
    sessions.persisted()
    sessions.close_idle(watermark=600.0)
    sessions.persisted()
    assert sessions.missing({("m", "a")}) == {("m", "a")}  # stored now: read back from storage


def test_close_idle_uses_the_watermark_and_allowed_lateness() -> None:
    sessions = tracker(gap_seconds=100.0, allowed_lateness_seconds=50.0)
    sessions.update(query("a", 0.0))
    sessions.update(query("b", 140.0))
    assert sessions.close_idle(watermark=140.0) == 0
    sessions.update(query("b", 151.0))
    assert sessions.close_idle(watermark=151.0) == 1
    assert [s.client_id for s in sessions] == ["b"]


def test_sessions_do_not_depend_on_how_clients_are_interleaved() -> None:
    rng = random.Random(3)
    streams = {client: sorted(rng.uniform(0, 5000) for _ in range(60)) for client in ("a", "b", "c", "d")}
    in_order = [(client, ts) for client, times in streams.items() for ts in times]
    by_time = sorted(in_order, key=lambda item: item[1])

    def sessions_of(order: list[tuple[str, float]]) -> set[tuple[str, int, float, float]]:
        # Mirrors the pipeline: per batch, restore what storage holds, update, sometimes close idle
        # sessions, then persist what changed.
        stored: dict[str, SessionState] = {}
        sessions = tracker(gap_seconds=120.0, max_duration_seconds=900.0, max_active=2)
        watermark = float("-inf")
        for start in range(0, len(order), 10):
            batch = order[start : start + 10]
            for key in sorted(sessions.missing({("m", client) for client, _ in batch})):
                latest = max(
                    (s for s in stored.values() if s.key == key),
                    key=lambda s: s.last_seen,
                    default=None,
                )
                if latest is not None:
                    sessions.restore(latest)
            for client, ts in batch:
                sessions.update(query(client, ts))
            watermark = max(watermark, max(ts for _, ts in batch))
            if rng.random() < 0.3:
                sessions.close_idle(watermark)
            stored.update((s.id, s) for s in sessions.changed())
            sessions.persisted()
        return {(s.client_id, s.queries, s.first_seen, s.last_seen) for s in stored.values()}

    assert sessions_of(in_order) == sessions_of(by_time)
