"""The pipeline's commit point on real databases: nothing leaves the pending state before it is durable,
database outages are waited out, and hostile timestamps, ids and event-id reuse cannot corrupt the state."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from sqlalchemy.engine import make_url

from detector.domain import Origin, RawRecord
from detector.metrics import Metrics
from detector.pipeline import Pipeline
from detector.service import build_pipeline, replay
from detector.settings import Settings
from detector.simulate.sample import START, oip_record, sample_records, write_sample
from detector.storage import Store, open_store
from detector.storage.errors import StorageUnavailable
from tests.support import fresh_postgres_database, make_settings
from tests.tcpproxy import TcpProxy

NOW = START + 7200.0  # "receipt time" of the records built here: two hours after the sample's start


def raw(value: bytes, position: int, received_at: float = NOW) -> RawRecord:
    return RawRecord(value, None, Origin("kafka", "logs", 0, position), received_at)


def sample(events: int, clients: int = 20, seed: int = 7) -> list[RawRecord]:
    lines = sample_records(clients=clients, events=events, seed=seed)
    return [raw(line, position) for position, line in enumerate(lines)]


def record(event_id: str, timestamp: float, client_id: str = "client-a", value: float = 0.5) -> bytes:
    rows = np.array([[value, 1.0, -1.0, 2.0]], dtype=np.float32)
    probabilities = np.array([[0.2, 0.8]], dtype=np.float32)
    return orjson.dumps(oip_record(event_id, timestamp, client_id, rows, probabilities))


@contextmanager
def pipeline_on(settings: Settings) -> Iterator[tuple[Pipeline, Store]]:
    with open_store(settings) as store:
        yield build_pipeline(settings, store, Metrics(), group_id=settings.kafka.group_id), store


def settings_for(url: str, **groups: dict[str, Any]) -> Settings:
    # Nothing commits by itself: each test says when.
    commit = {"min_records": 1_000_000, "min_interval_seconds": 3600.0} | groups.pop("commit", {})
    return make_settings(url, broker=None, commit=commit, **groups)


def stored_counts(store: Store) -> tuple[int, int]:
    """(queries counted into stored sessions, seen events stored)."""
    sessions = store.list_sessions(limit=1_000_000)
    return sum(session.queries for session in sessions), store.count_seen_events()


def test_a_failed_commit_keeps_everything_pending_for_the_next_attempt(tmp_path: Path) -> None:
    # A writer holding the SQLite lock longer than the busy timeout made the commit fail; the sessions had
    # already been taken from the tracker, so their queries were lost for good.
    path = tmp_path / "mia.db"
    settings = settings_for(f"sqlite:///{path}", database={"busy_timeout_seconds": 0.2})
    with pipeline_on(settings) as (pipeline, store):
        pipeline.submit(sample(300, seed=1))
        pipeline.commit()
        pipeline.submit(sample(400, seed=2))
        expected_queries = pipeline.stats.queries
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")

        with pytest.raises(StorageUnavailable):
            pipeline.commit()
        with pytest.raises(StorageUnavailable):
            pipeline.commit()  # still locked: still nothing lost

        other.execute("ROLLBACK")
        other.close()
        pipeline.commit()

        assert stored_counts(store) == (expected_queries, pipeline.stats.events)
        assert pipeline.uncommitted_records == 0
        assert store.checkpoints(settings.kafka.group_id) == {("logs", 0): 400}


@pytest.mark.postgres
def test_a_batch_whose_reads_fail_is_held_and_processed_once_the_database_is_back() -> None:
    with fresh_postgres_database() as url:
        parsed = make_url(url)
        with TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432) as proxy:
            through_proxy = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
            settings = settings_for(through_proxy)
            first, second = sample(300, seed=1), sample(300, seed=2)
            with pipeline_on(settings) as (pipeline, store):
                pipeline.submit(first)
                pipeline.commit()
                proxy.cut()

                with pytest.raises(StorageUnavailable):
                    pipeline.submit(second)
                assert pipeline.uncommitted_records == 300  # held, not processed
                assert pipeline.stats.events == 300
                with pytest.raises(StorageUnavailable):
                    pipeline.resume()

                proxy.restore()
                pipeline.resume()
                pipeline.flush()

                assert pipeline.stats.events == 600
                assert stored_counts(store) == (pipeline.stats.queries, 600)


@pytest.mark.postgres
@pytest.mark.parametrize("cut_after", ["seen_digests", "latest_sessions"])
def test_a_batch_whose_read_fails_after_another_succeeded_counts_its_queries_once(cut_after: str) -> None:
    # The connection went down between the read of the batch's sessions and that of its clients' features:
    # the sessions had counted the batch's queries already, and counted them again when it was retried.
    with fresh_postgres_database() as url:
        parsed = make_url(url)
        with TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432) as proxy:
            settings = settings_for(parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(False))
            newcomers = [
                raw(record(f"new-{index}", NOW - 600 + index, client_id=f"newcomer-{index % 5}"), 300 + index)
                for index in range(40)
            ]
            with pipeline_on(settings) as (pipeline, store):
                pipeline.submit(sample(300, seed=1))
                pipeline.commit()
                read = getattr(store, cut_after)

                def read_then_cut(*args: Any) -> Any:
                    found = read(*args)
                    proxy.cut()  # the next read of the batch fails
                    return found

                setattr(store, cut_after, read_then_cut)
                with pytest.raises(StorageUnavailable):
                    pipeline.submit(newcomers)
                setattr(store, cut_after, read)
                assert pipeline.stats.events == 300  # nothing of the batch counted
                proxy.restore()
                pipeline.resume()
                pipeline.flush()

                assert pipeline.stats.events == 340
                assert stored_counts(store) == (pipeline.stats.queries, 340)


def test_a_session_closed_by_a_failed_commit_is_not_replaced_by_its_stored_past(tmp_path: Path) -> None:
    # The commit closed an idle session, then failed (the database locked); the client came back before the
    # next commit and its session was read from storage, older than the one closed: the queries counted
    # since the last commit were overwritten by the stored count.
    path = tmp_path / "mia.db"
    settings = settings_for(
        f"sqlite:///{path}", database={"busy_timeout_seconds": 0.2}, sessions={"gap_seconds": 600.0}
    )
    start = NOW - 3600
    with pipeline_on(settings) as (pipeline, store):
        pipeline.submit([raw(record("a-1", start), 0)])
        pipeline.commit()
        later = [raw(record(f"a-{index}", start + 10 * index), index) for index in range(2, 5)]
        idle = [raw(record("b-1", start + 1500, client_id="client-b"), 5)]  # client-a idle from here
        pipeline.submit([*later, *idle])
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageUnavailable):
            pipeline.commit()  # client-a's session closed as idle, not stored

        pipeline.submit([raw(record("a-back", start + 1510), 6)])  # reads work while the lock is held
        other.execute("ROLLBACK")
        other.close()
        pipeline.commit()

        sessions = sorted((s.client_id, s.queries, s.status.value) for s in store.list_sessions())
        assert sessions == [("client-a", 1, "open"), ("client-a", 4, "closed"), ("client-b", 1, "open")]
        assert stored_counts(store) == (pipeline.stats.queries, 6)


def test_implausible_timestamps_are_dead_letters_and_do_not_move_event_time(tmp_path: Path) -> None:
    # One record stamped in year 9999 used to prune the seen-event ledger, close every session and resolve
    # every alert; one stamped in year 0001 crashed the daemon in a loop.
    settings = settings_for(f"sqlite:///{tmp_path / 'mia.db'}", sessions={"gap_seconds": 600.0})
    with pipeline_on(settings) as (pipeline, store):
        pipeline.submit([raw(record("e1", NOW - 60), 0)])
        pipeline.commit()
        hostile = [
            raw(record("far-future", 253_402_300_000.0 - 1), 1),  # 9999-12-31
            raw(record("ancient", -62_135_596_800.0 + 1), 2),  # 0001-01-01
            raw(record("tomorrow-and-more", NOW + 2 * 86_400), 3),
            # Within the horizon but beyond the clock skew: counted, yet event time stays near receipt.
            raw(record("skewed", NOW + 7200, client_id="client-b"), 4),
        ]
        pipeline.submit(hostile)
        pipeline.commit()

        letters = {letter.source: letter for letter in store.list_dead_letters()}
        assert {letter.reason for letter in letters.values()} == {"implausible_timestamp"}
        assert sorted(letters) == ["kafka:logs/0@1", "kafka:logs/0@2", "kafka:logs/0@3"]
        assert "ahead of its receipt" in letters["kafka:logs/0@1"].detail
        assert "before 1970" in letters["kafka:logs/0@2"].detail
        assert store.count_seen_events() == 2
        # client-a's session is not idle: event time moved to receipt + skew (5 min), not two hours ahead.
        statuses = {s.client_id: s.status.value for s in store.list_sessions()}
        assert statuses == {"client-a": "open", "client-b": "open"}


def test_records_reusing_an_event_id_with_other_content_are_dead_letters(database_url: str) -> None:
    settings = settings_for(database_url)
    with pipeline_on(settings) as (pipeline, store):
        original = record("e1", NOW - 60)
        pipeline.submit([raw(original, 0), raw(record("e1", NOW - 60, value=9.0), 1), raw(original, 2)])
        pipeline.commit()
        pipeline.submit([raw(original, 3), raw(record("e1", NOW - 30, client_id="other"), 4)])
        pipeline.commit()

        letters = store.list_dead_letters()
        assert sorted(letter.source for letter in letters) == ["kafka:logs/0@1", "kafka:logs/0@4"]
        assert {letter.reason for letter in letters} == {"conflicting_duplicate"}
        assert (pipeline.stats.events, pipeline.stats.duplicates) == (1, 2)
        assert stored_counts(store) == (1, 1)


def test_text_the_database_cannot_store_is_a_dead_letter(database_url: str) -> None:
    # On PostgreSQL a NUL character failed the whole batch's write (DataError), then every event of the
    # batch was skipped as a duplicate after the restart.
    settings = settings_for(database_url)
    good = [raw(record(f"ok-{index}", NOW - 60 + index), index) for index in range(3)]
    bad = {
        "client.id": record("nul-client", NOW - 50, client_id="evil\u0000key"),
        "event_id": record("nul\u0000event", NOW - 50),
        "model.name": record("nul-model", NOW - 50).replace(b'"credit-risk"', b'"credit\\u0000risk"', 1),
        "client.user_agent": record("nul-agent", NOW - 50).replace(
            b'"python-requests/2.32"', b'"python\\u0000requests"', 1
        ),
    }
    hostile = [raw(value, 10 + index) for index, value in enumerate(bad.values())]
    with pipeline_on(settings) as (pipeline, store):
        pipeline.submit([*good, *hostile])
        pipeline.commit()

        letters = sorted(store.list_dead_letters(), key=lambda letter: letter.source)
        assert [letter.reason for letter in letters] == ["schema_violation"] * 4
        for letter, field in zip(letters, bad, strict=True):
            assert letter.detail == f"{field}: contains a NUL character, which cannot be stored"
        assert stored_counts(store) == (3, 3)


def test_a_second_replay_long_after_the_events_counts_nothing_twice(tmp_path: Path) -> None:
    # Event ids used to be forgotten by event time: a replay of records spanning more than the retention
    # counted the older ones again.
    events = tmp_path / "events.jsonl"
    lines = [record(f"e{day}", START + day * 86_400.0) for day in range(6)]  # six days of events
    events.write_bytes(b"\n".join(lines) + b"\n")
    settings = settings_for(f"sqlite:///{tmp_path / 'mia.db'}", commit={"min_records": 2})

    first = replay(settings, [str(events)])
    second = replay(settings, [str(events)])

    assert (first.events, first.duplicates) == (6, 0)
    assert (second.events, second.duplicates) == (0, 6)
    with open_store(settings) as store:
        assert stored_counts(store) == (6, 6)


def test_replay_waits_out_a_locked_database(tmp_path: Path) -> None:
    path = tmp_path / "mia.db"
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=10, events=600)
    settings = settings_for(
        f"sqlite:///{path}",
        database={
            "busy_timeout_seconds": 0.1,
            "retry_initial_seconds": 0.05,
            "retry_max_seconds": 0.2,
            "migrate_on_start": False,  # migrated below, before the lock is taken
        },
        commit={"min_records": 100},
        kafka={"max_poll_records": 50},
    )
    with open_store(settings, migrate=True):
        pass
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # held from the start: the first commits fail until it is released
    release = threading.Timer(1.5, other.execute, args=("ROLLBACK",))
    release.start()
    metrics = Metrics()
    try:
        stats = replay(settings, [str(events)], metrics=metrics)
    finally:
        release.join()
        other.close()

    assert metrics.storage_errors.labels(outcome="unavailable")._value.get() >= 2
    assert metrics.storage_available._value.get() == 1
    assert stats.events == 600
    with open_store(settings) as store:
        assert stored_counts(store) == (stats.queries, 600)
