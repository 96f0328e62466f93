"""End to end through the real broker and databases: replay vs Kafka, dead letters, idempotency."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer
from sqlalchemy import select

from detector.broker import EmbeddedBroker
from detector.ingest.kafka import KafkaSource
from detector.kafka import KafkaPublisher, ensure_topic
from detector.protocols import index_training_sets
from detector.service import StopFlag, produce_file, replay, run_daemon, train
from detector.service.produce import client_key
from detector.settings import Settings
from detector.simulate.attacks import AttackKind
from detector.simulate.sample import oip_record, write_sample
from detector.simulate.scenarios import SCENARIOS, CampaignPlan
from detector.simulate.simulator import simulate
from detector.simulate.traffic import HOUR
from detector.storage import open_alert_store, open_store
from detector.storage.tables import NotificationRow
from tests.support import make_settings, unique

pytestmark = pytest.mark.kafka


def session_rows(settings: Settings) -> set[tuple[Any, ...]]:
    with open_store(settings) as store:
        sessions = store.list_sessions(limit=100_000)
    return {
        (
            s.model,
            s.client_id,
            s.status.value,
            s.queries,
            s.requests,
            s.confidence_queries,
            s.text_queries,
            s.max_batch_size,
            round(s.first_seen, 3),
            round(s.last_seen, 3),
        )
        for s in sessions
    }


def consume(settings: Settings) -> Any:
    return run_daemon(settings, StopFlag(), idle_exit_seconds=4.0)


@pytest.mark.slow
def test_replay_and_kafka_give_identical_sessions(
    broker: EmbeddedBroker, database_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=40, events=4000, malformed_every=101)
    # A short gap splits clients' activity into many sessions, so that the comparison means something.
    sessions = {"gap_seconds": 240.0, "max_duration_seconds": 1200.0, "max_active": 25}

    replayed = make_settings(sqlite_url, sessions=sessions)
    replay_stats = replay(replayed, [str(events)])

    streamed = make_settings(database_url, broker, sessions=sessions)
    produce_file(streamed, events, streamed.kafka.topics[0])
    kafka_stats = consume(streamed)

    assert kafka_stats.records == replay_stats.records == 4000
    assert kafka_stats.queries == replay_stats.queries > 4000  # batches were expanded into rows
    assert kafka_stats.dead_letters == replay_stats.dead_letters
    replay_sessions = session_rows(replayed)
    assert len({row[1] for row in replay_sessions}) == 40
    assert len(replay_sessions) > 80  # the short gap did split sessions
    assert session_rows(streamed) == replay_sessions
    assert sum(row[3] for row in replay_sessions) == replay_stats.queries


def bad_records() -> dict[str, bytes]:
    """One record per dead-letter reason, under the limits set in `test_every_bad_record_...`."""
    base = orjson.loads(
        orjson.dumps(oip_record("x", 1_764_403_200.0, "bad-client", *_one_row(), want_probabilities=True))
    )

    def variant(**changes: Any) -> bytes:
        record = orjson.loads(orjson.dumps(base))
        for path, value in changes.items():
            target = record
            keys = path.split("__")
            for key in keys[:-1]:
                target = target[int(key)] if key.isdigit() else target[key]
            target[keys[-1]] = value
        return orjson.dumps(record)

    nan_record = variant(event_id="nan").replace(b'"data":[0.5', b'"data":[NaN', 1)
    return {
        "record_too_large": variant(event_id="big", padding="x" * 5000),
        "invalid_encoding": b'{"event_id": "\xff\xfe"}',
        "invalid_json": b'{"event_id": "broken", ',
        "schema_violation": variant(event_id="schema", client={"ip": "203.0.113.9"}),
        "unsupported_datatype": variant(event_id="dtype", request__inputs__0__datatype="COMPLEX64"),
        "shape_mismatch": variant(event_id="shape", request__inputs__0__shape=[1, 7]),
        "non_finite": nan_record,
        "batch_too_large": variant(event_id="batch", request__inputs__0__shape=[5, 1], response=None),
    }


def _one_row() -> tuple[Any, Any]:
    import numpy as np

    rows = np.array([[0.5, 1.0, -1.0, 2.0, 0.25]], dtype=np.float32)
    return rows, np.array([[0.2, 0.8]], dtype=np.float32)


def valid_record(index: int) -> bytes:
    rows, probabilities = _one_row()
    return orjson.dumps(
        oip_record(f"good-{index}", 1_764_403_200.0 + index, f"client-{index % 3}", rows, probabilities)
    )


def test_every_bad_record_is_dead_lettered_and_the_stream_goes_on(
    broker: EmbeddedBroker, database_url: str, tmp_path: Path
) -> None:
    bad = bad_records()
    lines: list[bytes] = []
    for index, raw in enumerate(bad.values()):
        lines += [valid_record(2 * index), raw, valid_record(2 * index + 1)]
    events = tmp_path / "mixed.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")

    dead_letter_topic = unique("dead-letters")
    settings = make_settings(
        database_url,
        broker,
        kafka={"dead_letter_topic": dead_letter_topic},
        ingest={"max_record_bytes": 4096, "max_batch_rows": 4, "dead_letter_raw_bytes": 64},
    )
    produce_file(settings, events, settings.kafka.topics[0])
    stats = consume(settings)

    assert stats.events == 2 * len(bad)
    assert dict(stats.dead_letters) == dict.fromkeys(bad, 1)
    with open_store(settings) as store:
        stored = store.list_dead_letters()
        sessions = store.list_sessions()
    assert sorted(letter.reason for letter in stored) == sorted(bad)
    topic = settings.kafka.topics[0]
    for letter in stored:
        assert letter.source.startswith(f"kafka:{topic}/")
        assert len(letter.raw) <= 64 and letter.raw_size >= len(letter.raw)
        assert letter.detail and "\n" not in letter.detail
    assert sum(s.queries for s in sessions) == 2 * len(bad)

    consumer = KafkaConsumer(
        dead_letter_topic,
        bootstrap_servers=broker.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=8000,
        group_id=unique("dlq-reader"),
        session_timeout_ms=6000,
    )
    published = []
    for message in consumer:
        published.append(dict(message.headers)["mia-reason"].decode())
        if len(published) == len(bad):
            break
    consumer.close()
    assert sorted(published) == sorted(bad)


def test_replaying_the_same_events_twice_changes_nothing(database_url: str, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=10, events=600, malformed_every=50)
    settings = make_settings(database_url)
    first = replay(settings, [str(events)])
    before = session_rows(settings)
    with open_store(settings) as store:
        dead_before = store.dead_letter_counts()

    second = replay(settings, [str(events)])

    assert first.events == 588 and second.events == 0
    assert second.duplicates == 588
    assert session_rows(settings) == before
    with open_store(settings) as store:
        assert store.dead_letter_counts() == dead_before


def test_a_duplicated_event_inside_one_stream_is_counted_once(database_url: str, tmp_path: Path) -> None:
    lines = [valid_record(0), valid_record(1), valid_record(0), valid_record(2), valid_record(1)]
    events = tmp_path / "dupes.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    settings = make_settings(database_url)
    stats = replay(settings, [str(events)])
    assert (stats.events, stats.duplicates) == (3, 2)
    with open_store(settings) as store:
        assert sum(s.queries for s in store.list_sessions()) == 3


# -- one incident per attack, however fast the stream is consumed -------------------------------------------


def incidents(settings: Settings) -> list[tuple[Any, ...]]:
    """Every alert stored, as what must not depend on the speed of consumption: its key, when in the stream
    it was detected and after how many queries, its span of event time. (Not whether the last ones are
    resolved yet: each goes quiet in the event time of its own partition, and where a partition ends
    depends on how the clients were spread over them.)"""
    with open_alert_store(settings) as store:
        alerts = store.list_alerts(limit=None)
    return sorted(
        (a.dedup_key, a.detected_at, a.detected_after_queries, a.first_seen, a.last_seen) for a in alerts
    )


def notified_events(settings: Settings) -> dict[int, list[str]]:
    """The notification events queued per alert id, in order."""
    with open_store(settings) as store, store.engine.connect() as connection:
        rows = connection.execute(
            select(NotificationRow.alert_id, NotificationRow.event).order_by(NotificationRow.id)
        ).all()
    events: dict[int, list[str]] = {}
    for alert_id, event in rows:
        events.setdefault(alert_id, []).append(event)
    return events


@pytest.mark.slow
def test_live_backlog_and_replay_consumption_give_the_same_incidents(
    broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three simulated hours: two attackers of each kind in bursts, each burst followed by quiet long enough
    # for its incident to resolve.
    smoke = SCENARIOS["smoke"]
    modes = replace(
        smoke,
        name="modes",
        duration=3 * HOUR,
        campaigns=tuple(CampaignPlan(kind, (2, 2)) for kind in AttackKind),
        candidate_scale=0.5,
    )
    monkeypatch.setitem(SCENARIOS, modes.name, modes)
    simulation = simulate(modes.name, 3, tmp_path / "scenario")
    indexes = index_training_sets(simulation.out, tmp_path / "indexes")
    base = make_settings(f"sqlite:///{tmp_path / 'train.db'}").model_copy(update={"training_index": indexes})
    train(base, [str(simulation.out / "baseline.jsonl")], 0.001, tmp_path / "model")
    events = simulation.out / "events.jsonl"

    def settings_for(mode: str, **groups: dict[str, Any]) -> Settings:
        settings = make_settings(
            f"sqlite:///{tmp_path / mode}.db",
            broker,
            ocsf={"file": str(tmp_path / f"{mode}.jsonl")},
            **groups,
        )
        return settings.model_copy(update={"training_index": indexes, "model_path": tmp_path / "model"})

    # Replay: the file read 500 records a poll, committed every 500.
    replayed = settings_for("replay")
    replay(replayed, [str(events)])
    # Backlog: the whole day on the topic before the daemon starts; it commits every 20,000 records.
    backlog = settings_for("backlog", commit={"min_records": 20_000, "min_interval_seconds": 60.0})
    produce_file(backlog, events, backlog.kafka.topics[0])
    consume(backlog)
    # Live: produced while the daemon consumes, a little at a time, committed often.
    live = settings_for("live", commit={"min_records": 50, "min_interval_seconds": 0.2})
    daemon = ThreadPoolExecutor(1).submit(consume, live)
    produce_file(live, events, live.kafka.topics[0], progress=lambda _batch: time.sleep(1.0))
    daemon.result(timeout=300)

    found = incidents(replayed)
    assert len(found) >= 4 and len({key.rsplit("|", 1)[1] for key, *_ in found}) >= 3
    assert incidents(backlog) == found
    assert incidents(live) == found
    # Every incident opened with a notification has its resolution notified once it resolved.
    for settings in (replayed, backlog, live):
        with open_alert_store(settings) as store:
            resolved = {a.id for a in store.list_alerts(status="resolved", limit=None)}
        for alert_id, sent in notified_events(settings).items():
            assert sent[0] == "opened"
            assert ("resolved" in sent) == (alert_id in resolved), (alert_id, sent)


# -- detection state that survives a restart -----------------------------------------------------------------


def test_a_stream_read_in_two_processes_gives_the_alerts_of_one(database_url: str, tmp_path: Path) -> None:
    """The scenario replayed whole, and replayed as its first and second halves by two processes one after
    the other into one database: the second goes on from the features the first stored, so every attack
    spanning the cut is detected at the same query, as one incident."""
    simulation = simulate("smoke", 5, tmp_path / "scenario")
    indexes = index_training_sets(simulation.out, tmp_path / "indexes")
    lines = (simulation.out / "events.jsonl").read_bytes().splitlines(keepends=True)
    halves = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    halves[0].write_bytes(b"".join(lines[: len(lines) // 2]))
    halves[1].write_bytes(b"".join(lines[len(lines) // 2 :]))

    whole = make_settings(f"sqlite:///{tmp_path / 'whole.db'}").model_copy(update={"training_index": indexes})
    replay(whole, [str(simulation.out / "events.jsonl")])
    cut = make_settings(database_url).model_copy(update={"training_index": indexes})
    for half in halves:
        replay(cut, [str(half)])  # a process of its own: nothing in memory carries over

    found = incidents(whole)
    assert len(found) >= 4
    assert incidents(cut) == found
    with open_store(cut) as store:
        assert sum(session.queries for session in store.list_sessions()) == sum(
            session.queries for session in open_store(whole).list_sessions()
        )


def test_a_daemon_told_to_exit_when_idle_waits_for_the_partitions_another_member_holds(
    broker: EmbeddedBroker, database_url: str, tmp_path: Path
) -> None:
    # A member given only part of the partitions used to stop once its own share was drained, while the
    # others, held by a member that has committed nothing yet (as a killed one holds them until its session
    # times out), still had the rest of the stream.
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=24, events=240)
    settings = make_settings(database_url, broker, kafka={"poll_timeout_ms": 200})
    topic = settings.kafka.topics[0]
    ensure_topic(settings.kafka, topic, 4)
    publisher = KafkaPublisher(settings.kafka)
    for line in events.read_bytes().splitlines():
        publisher.send(topic, line, client_key(line))
        publisher.flush()  # one batch a record: the broker then reports true end offsets
    publisher.close()
    other = KafkaSource(settings.kafka, on_revoke=lambda: None)
    other_in_group, daemon_done = threading.Event(), threading.Event()

    def read_and_commit_late() -> tuple[int, float]:
        """Join the group; once it shares the partitions with the daemon and has read its own to their end,
        wait 6 s more, then commit them; stay in the group until the daemon is done. The records it
        committed, and when."""
        deadline = time.monotonic() + 120
        positions: dict[tuple[str, int], int] = {}
        read_all_at = None
        while read_all_at is None or time.monotonic() - read_all_at < 6:
            assert time.monotonic() < deadline, f"the other member read {positions}"
            for record in other.poll():
                positions[(record.origin.name, record.origin.partition)] = record.origin.position + 1
            held = other._consumer.assignment()
            if held:
                other_in_group.set()
            if read_all_at is None and 0 < len(held) < 4:
                ends = other._consumer.end_offsets(list(held))
                if all(positions.get(partition, 0) >= end for partition, end in ends.items()):
                    read_all_at = time.monotonic()
        committed = {partition: positions.get(partition, 0) for partition in other._consumer.assignment()}
        other.commit(committed)
        committed_at = time.monotonic()
        while not daemon_done.is_set():
            other.poll()
        return sum(committed.values()), committed_at  # offsets of a new topic count its records

    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(read_and_commit_late)
        assert other_in_group.wait(60)
        try:
            stats = run_daemon(settings, StopFlag(), idle_exit_seconds=2.0)
            stopped_at = time.monotonic()
        finally:
            daemon_done.set()
        read_by_other, committed_at = late.result(timeout=60)
    other.close()

    assert 0 < read_by_other < 240 and stats.records == 240 - read_by_other, (read_by_other, stats.records)
    assert stopped_at > committed_at, "stopped before the other member's partitions were committed"
