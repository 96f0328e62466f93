"""`Store` on SQLite and PostgreSQL: batch writes are atomic and idempotent, reads return what was written."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from detector.domain import (
    DeadLetter,
    DeadLetterReason,
    Exposure,
    Origin,
    SessionState,
    SessionStatus,
    utc,
)
from detector.storage import Checkpoint, DurableBatch, SeenEvent, Store, StoredClientState
from detector.storage.errors import StorageFailed
from detector.storage.tables import SeenEventRow

from .conftest import START, FakeClock, write


def session(
    id: str,
    model: str = "fraud-v1",
    client_id: str = "client-a",
    first_seen: float = START,
    last_seen: float = START + 60.5,
    status: SessionStatus = SessionStatus.OPEN,
    queries: int = 10,
) -> SessionState:
    return SessionState(
        id=id,
        model=model,
        client_id=client_id,
        first_seen=first_seen,
        last_seen=last_seen,
        status=status,
        queries=queries,
        requests=4,
        confidence_queries=7,
        text_queries=1,
        max_batch_size=3,
        model_version="3",
        client_ip="10.0.0.1",
        user_agent="curl/8.5",
    )


def dead_letter(
    position: int,
    reason: DeadLetterReason = DeadLetterReason.INVALID_JSON,
    detail: str = "expecting value",
    kind: str = "kafka",
) -> DeadLetter:
    return DeadLetter(
        reason=reason,
        detail=detail,
        origin=Origin(kind=kind, name="inference-logs", partition=2, position=position),
        raw=b"{not json" + bytes([0, 255]),
        raw_size=5000,
        received_at=START + 0.123456,
    )


def seen(event_id: str, event_time: float = START) -> SeenEvent:
    return SeenEvent(event_id, event_time, event_id.encode().ljust(16, b"#"))


def full_batch() -> DurableBatch:
    return DurableBatch(
        seen_events=[seen("e1", START), seen("e2", START + 1), seen("e3", START + 2)],
        sessions=[session("s1"), session("s2", client_id="client-b", status=SessionStatus.CLOSED)],
        dead_letters=[dead_letter(7), dead_letter(8, DeadLetterReason.SCHEMA_VIOLATION)],
        checkpoints=[Checkpoint("mia", "inference-logs", 0, 100), Checkpoint("mia", "inference-logs", 1, 42)],
    )


def snapshot(store: Store) -> dict[str, object]:
    return {
        "seen": store.count_seen_events(),
        "sessions": store.list_sessions(),
        "dead_letters": store.list_dead_letters(),
        "checkpoints": store.checkpoints("mia"),
    }


def test_write_stores_every_part_of_the_batch(store: Store) -> None:
    batch = full_batch()

    write(store, batch)

    assert store.count_seen_events() == 3
    assert store.count_sessions() == 2
    assert sorted(store.list_sessions(), key=lambda s: s.id) == batch.sessions
    assert store.dead_letter_counts() == {"invalid_json": 1, "schema_violation": 1}
    assert store.checkpoints("mia") == {("inference-logs", 0): 100, ("inference-logs", 1): 42}


def test_writing_the_same_batch_twice_changes_nothing(store: Store, clock: FakeClock) -> None:
    write(store, full_batch())
    first = snapshot(store)

    clock.now += 3600
    write(store, full_batch())

    assert snapshot(store) == first
    assert first["seen"] == 3
    assert len(store.list_dead_letters()) == 2


def test_session_upsert_overwrites_every_column(store: Store) -> None:
    write(store, DurableBatch(sessions=[session("s1")]))
    later = dataclasses.replace(
        session("s1", last_seen=START + 900, status=SessionStatus.CLOSED, queries=99),
        model_version=None,
        client_ip="10.0.0.2",
        user_agent=None,
        max_batch_size=64,
    )

    write(store, DurableBatch(sessions=[later]))

    assert store.list_sessions() == [later]


def test_repeated_ids_within_one_batch_keep_the_last_session_state(store: Store) -> None:
    write(store, DurableBatch(sessions=[session("s1", queries=1), session("s1", queries=2)]))

    assert [s.queries for s in store.list_sessions()] == [2]


def test_seen_digests(store: Store) -> None:
    events = [seen(f"event-{i}", START + i) for i in range(0, 1200, 2)]
    write(store, DurableBatch(seen_events=[seen("a"), seen("b"), *events]))

    assert store.seen_digests(["a", "b", "c", "d"]) == {"a": seen("a").digest, "b": seen("b").digest}
    assert store.seen_digests([]) == {}
    # More ids than one IN list holds.
    asked = [f"event-{i}" for i in range(1200)]
    assert set(store.seen_digests(asked)) == {f"event-{i}" for i in range(0, 1200, 2)}


def test_latest_sessions_picks_the_newest_session_of_each_key(store: Store) -> None:
    a_old = session("a-old", last_seen=START + 10, status=SessionStatus.OPEN)
    a_new = session("a-new", first_seen=START + 5000, last_seen=START + 6000, status=SessionStatus.CLOSED)
    a_mid = session("a-mid", first_seen=START + 3000, last_seen=START + 3500, status=SessionStatus.CLOSED)
    b = session("b", client_id="client-b", last_seen=START + 20)
    other_model = session("a-other-model", model="spam-v2", last_seen=START + 9000)
    write(store, DurableBatch(sessions=[a_old, a_new, a_mid, b, other_model]))

    latest = store.latest_sessions(
        [("fraud-v1", "client-a"), ("fraud-v1", "client-b"), ("fraud-v1", "nobody")]
    )

    assert sorted(latest, key=lambda s: s.id) == [a_new, b]
    assert all(not s.dirty for s in latest)
    assert {s.id: s.last_seen for s in latest} == {"a-new": START + 6000, "b": START + 20}
    assert store.latest_sessions([]) == []


def test_latest_sessions_over_many_keys(store: Store) -> None:
    sessions = [session(f"s{i}", client_id=f"client-{i}", last_seen=START + i) for i in range(1100)]
    write(store, DurableBatch(sessions=sessions))

    latest = store.latest_sessions([("fraud-v1", f"client-{i}") for i in range(0, 1100, 2)])

    assert sorted(s.id for s in latest) == sorted(f"s{i}" for i in range(0, 1100, 2))


def test_stale_open_sessions_are_closed(store: Store) -> None:
    write(
        store,
        DurableBatch(
            sessions=[
                session("stale", last_seen=START + 100),
                session("fresh", last_seen=START + 200),
                session("done", last_seen=START + 50, status=SessionStatus.CLOSED),
            ]
        ),
    )

    write(
        store,
        DurableBatch(
            # Written and closed in the same transaction: closing applies to the stored state.
            sessions=[session("stale-in-batch", client_id="client-b", last_seen=START + 149)],
            close_sessions_before=START + 150,
        ),
    )

    statuses = {s.id: s.status for s in store.list_sessions()}
    assert statuses == {
        "stale": SessionStatus.CLOSED,
        "fresh": SessionStatus.OPEN,
        "done": SessionStatus.CLOSED,
        "stale-in-batch": SessionStatus.CLOSED,
    }


def test_seen_events_are_forgotten_a_retention_after_they_were_processed(
    store: Store, clock: FakeClock
) -> None:
    write(store, DurableBatch(seen_events=[seen("old")]))
    clock.now += 100
    write(store, DurableBatch(seen_events=[seen("edge")]))
    clock.now += 100
    # Event times do not matter: one far in the future (a forged timestamp) forgets nothing, and one far in
    # the past (a replay of old records) is remembered like the others.
    write(store, DurableBatch(seen_events=[seen("future", START + 1e9), seen("ancient", 0.0)]))

    write(store, DurableBatch(forget_seen_after_seconds=100))

    assert store.count_seen_events() == 3
    assert set(store.seen_digests(["old", "edge", "future", "ancient"])) == {"edge", "future", "ancient"}


def test_dead_letters_are_stored_once_per_source(store: Store, clock: FakeClock) -> None:
    write(store, DurableBatch(dead_letters=[dead_letter(7, detail="first"), dead_letter(7, detail="again")]))
    clock.now += 10
    write(
        store,
        DurableBatch(
            dead_letters=[
                dead_letter(7, DeadLetterReason.NON_FINITE, detail="re-delivered"),
                dead_letter(7, kind="file"),  # same name and position, other kind of source
                dead_letter(9, DeadLetterReason.NON_FINITE),
            ]
        ),
    )

    stored = store.list_dead_letters()
    assert [(d.source, d.reason, d.detail) for d in stored] == [
        ("kafka:inference-logs/2@9", "non_finite", "expecting value"),
        ("file:inference-logs:7", "invalid_json", "expecting value"),
        ("kafka:inference-logs/2@7", "invalid_json", "first"),
    ]
    assert store.dead_letter_counts() == {"invalid_json": 2, "non_finite": 1}
    assert [d.source for d in store.list_dead_letters(reason="non_finite")] == ["kafka:inference-logs/2@9"]
    assert len(store.list_dead_letters(limit=1)) == 1


def test_dead_letter_fields_and_times_round_trip_in_utc(store: Store, clock: FakeClock) -> None:
    write(store, DurableBatch(dead_letters=[dead_letter(7)]))

    [stored] = store.list_dead_letters()

    assert stored.raw == b"{not json\x00\xff"
    assert stored.raw_size == 5000
    assert stored.received_at == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert stored.received_at.utcoffset() == timedelta(0)
    assert stored.created_at == datetime.fromtimestamp(clock.now, UTC)
    assert stored.created_at.tzinfo is UTC


def test_utc_datetime_converts_offsets_and_refuses_naive_values(store: Store, engine: Engine) -> None:
    kolkata = timezone(timedelta(hours=5, minutes=30))
    event_time = datetime(2024, 3, 1, 12, 0, tzinfo=kolkata)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # The server hands timestamps back in the session's zone: they must still come back in UTC.
            connection.exec_driver_sql("SET TIME ZONE 'America/New_York'")
        with Session(bind=connection) as orm:
            orm.add(SeenEventRow(event_id="x", event_time=event_time, seen_at=event_time))
            orm.flush()
            orm.expire_all()
            stored = orm.scalars(select(SeenEventRow.event_time)).one()

    assert stored == datetime(2024, 3, 1, 6, 30, tzinfo=UTC)
    assert stored.tzinfo is UTC

    with pytest.raises(StatementError, match="naive datetime"), Session(engine) as orm:
        orm.add(SeenEventRow(event_id="y", event_time=datetime(2024, 3, 1), seen_at=event_time))
        orm.flush()


def test_session_times_round_trip_as_epoch_seconds(store: Store) -> None:
    written = session("s1", first_seen=START + 0.000001, last_seen=START + 1234.5)
    write(store, DurableBatch(sessions=[written]))

    [read] = store.latest_sessions([written.key])

    assert (read.first_seen, read.last_seen) == (START + 0.000001, START + 1234.5)


def test_checkpoints_are_upserted_per_group_topic_and_partition(store: Store) -> None:
    write(
        store,
        DurableBatch(
            checkpoints=[
                Checkpoint("mia", "inference-logs", 0, 10),
                Checkpoint("mia", "inference-logs", 1, 5),
                Checkpoint("other", "inference-logs", 0, 7),
            ]
        ),
    )

    write(store, DurableBatch(checkpoints=[Checkpoint("mia", "inference-logs", 0, 20)]))

    assert store.checkpoints("mia") == {("inference-logs", 0): 20, ("inference-logs", 1): 5}
    assert store.checkpoints("other") == {("inference-logs", 0): 7}
    assert store.checkpoints("nobody") == {}


def test_client_states_and_learned_scales_are_overwritten_and_read_back(store: Store) -> None:
    many = [StoredClientState("m", f"c{index}", bytes([index % 256]) * 3, START) for index in range(1200)]
    write(store, DurableBatch(client_states=many, model_scales={"m": b"scale-1", "other": b"s"}))
    write(
        store,
        DurableBatch(
            client_states=[StoredClientState("m", "c1", b"newer", START + 60)], model_scales={"m": b"scale-2"}
        ),
    )

    keys = [("m", f"c{index}") for index in range(1200)] + [("m", "absent"), ("other", "c1")]
    read = store.client_states(keys)  # more keys than one statement's chunk
    assert len(read) == 1200 and read[("m", "c1")] == b"newer" and read[("m", "c7")] == b"\x07" * 3
    assert store.client_states([]) == {}
    assert store.every_client_state() == {
        ("m", f"c{index}"): b"newer" if index == 1 else bytes([index % 256]) * 3 for index in range(1200)
    }
    assert store.model_scales() == {"m": b"scale-2", "other": b"s"}


def test_a_clients_exposure_is_stored_with_its_state_per_model(store: Store) -> None:
    exposed = Exposure(probability_records=300, training_records=41, label_only_answers=7, probes=12)
    write(
        store,
        DurableBatch(
            client_states=[
                StoredClientState("m", "c1", b"s", START + 60, START, exposed),
                StoredClientState("n", "c1", b"s", START + 5),  # a state as stored before exposure was kept
                StoredClientState("m", "c2", b"s", START + 60, START, exposed),
            ]
        ),
    )

    first, second = store.client_exposures("c1")
    assert (first.model, first.exposure, first.first_seen, first.last_seen) == (
        "m",
        exposed,
        utc(START),
        utc(START + 60),
    )
    assert (second.model, second.exposure, second.first_seen) == ("n", Exposure(), None)
    assert [entry.model for entry in store.client_exposures("c1", model="n")] == ["n"]
    assert store.client_exposures("nobody") == []


def test_a_failed_write_stores_nothing(store: Store) -> None:
    broken = dataclasses.replace(session("s1"), queries=None)  # type: ignore[arg-type]  # NOT NULL, mid-transaction
    batch = full_batch()
    batch.sessions.append(broken)

    with pytest.raises(StorageFailed) as raised:  # waiting would not make this batch storable
        write(store, batch)

    assert isinstance(raised.value.__cause__, IntegrityError)
    assert "INSERT" not in str(raised.value)  # no SQL (nor its parameters) in what gets logged

    assert snapshot(store) == {"seen": 0, "sessions": [], "dead_letters": [], "checkpoints": {}}


def test_list_sessions_filters_and_orders_newest_first(store: Store) -> None:
    write(
        store,
        DurableBatch(
            sessions=[
                session("a1", last_seen=START + 10),
                session("a2", last_seen=START + 30),
                session("a3", model="spam-v2", last_seen=START + 20),
                session("b1", client_id="client-b", last_seen=START + 40),
            ]
        ),
    )

    assert [s.id for s in store.list_sessions()] == ["b1", "a2", "a3", "a1"]
    assert [s.id for s in store.list_sessions(client_id="client-a")] == ["a2", "a3", "a1"]
    assert [s.id for s in store.list_sessions(client_id="client-a", model="fraud-v1")] == ["a2", "a1"]
    assert [s.id for s in store.list_sessions(model="spam-v2")] == ["a3"]
    assert [s.id for s in store.list_sessions(limit=2)] == ["b1", "a2"]
    assert store.count_sessions() == 4
