"""Fault: the database is out of reach for 30 s mid-stream: PostgreSQL behind a TCP proxy that is cut
(`tests/tcpproxy.py`: open connections reset, new ones refused), or a SQLite file locked by another process
(`BEGIN IMMEDIATE`, with the daemon's busy timeout at 0.5 s).

The daemon must stop committing, hold consumption (back-pressure: the consumer keeps polling, so it stays in
its group and no rebalance happens), retry with backoff, say so (`mia_detector_storage_available` 0, a
warning) and carry on once the database is back, with nothing lost. Several times during the outage the
test reads the offsets the broker holds for the group and the checkpoints stored with the results: the
broker's offsets must never be ahead of the stored checkpoints, and nothing may be stored meanwhile.

Sent: 7,080 records over about 40 s: 6,000 benign records (40 clients, 12 malformed) and two augmentation
probers of 540 records each. Processed: every event once, as a fault-free replay of the same file counts
them. De-duplicated: none expected (nothing is read twice when nothing is committed ahead). Alerts: the
reference's keys (one per prober), no sink configured.

    .venv/bin/pytest tests/faults/test_database_outage.py --basetemp=/tmp/faults-tests -p no:cacheprovider
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from detector.broker import EmbeddedBroker, free_port
from detector.settings import Settings
from detector.storage import open_store
from tests.faults.harness import (
    Daemon,
    LiveProducer,
    committed_offsets,
    daemon_env,
    reference,
    summary_figures,
    tally,
    tracebacks,
    wait_until,
    write_traffic,
)
from tests.support import fresh_postgres_database, make_settings
from tests.tcpproxy import TcpProxy

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

OUTAGE_SECONDS = 30.0
SAMPLE_SECONDS = 3.0
AVAILABLE = "mia_detector_storage_available"
UNAVAILABLE_ERRORS = 'mia_detector_storage_errors_total{outcome="unavailable"}'


@dataclass(frozen=True)
class Sample:
    """One look during the outage: seconds into it, what /metrics said, events stored, and per partition
    the broker's committed offset against the stored checkpoint."""

    at: float
    available: float
    stored: int
    ahead: dict[tuple[str, int], tuple[int, int]]  # partitions whose committed offset > checkpoint


def run_through_outage(
    broker: EmbeddedBroker,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    *,
    daemon_url: str,
    direct_url: str,
    begin: Callable[[], None],
    end: Callable[[], None],
    extra_env: dict[str, str] | None = None,
) -> None:
    """Stream through a daemon writing to `daemon_url` while the test reads `direct_url` (the same
    database); `begin` and `end` the outage a quarter of the way in; check everything said above."""
    traffic = write_traffic(tmp_path / "events.jsonl", benign_events=6_000, probers=2, prober_rounds=60)
    expected = reference([traffic.path], tmp_path)
    settings: Settings = make_settings(direct_url, broker)
    topic, group = settings.kafka.topics[0], settings.kafka.group_id
    store = open_store(settings)
    request.addfinalizer(store.close)
    producer = LiveProducer(settings, [traffic.path], 40.0).start(request)
    port = free_port()
    env = daemon_env(
        daemon_url,
        broker.bootstrap_servers,
        MIA_METRICS_ADDR=f"127.0.0.1:{port}",
        MIA_COMMIT_MIN_RECORDS="1000",
        MIA_COMMIT_MIN_INTERVAL_SECONDS="1",
        MIA_DATABASE_RETRY_INITIAL_SECONDS="0.5",
        MIA_DATABASE_RETRY_MAX_SECONDS="4",
        **(extra_env or {}),
    )
    daemon = Daemon(["--topic", topic, "--group-id", group], env, tmp_path / "daemon.log", request, port)
    wait_until(lambda: store.count_seen_events() >= expected.events // 4, 90, "a quarter of the stream")
    time.sleep(0.5)  # records read since the last commit are pending when the outage comes

    begin()
    began = time.monotonic()
    stored_at_start = store.count_seen_events()
    samples: list[Sample] = []
    try:
        while (elapsed := time.monotonic() - began) < OUTAGE_SECONDS:
            time.sleep(min(SAMPLE_SECONDS, max(0.0, OUTAGE_SECONDS - elapsed)))
            committed = committed_offsets(broker.bootstrap_servers, group, topic)
            checkpoints = store.checkpoints(group)
            ahead = {
                key: (offset, checkpoints.get(key, 0))
                for key, offset in committed.items()
                if offset > checkpoints.get(key, 0)
            }
            samples.append(
                Sample(
                    time.monotonic() - began,
                    daemon.scrape().get(AVAILABLE, float("nan")),
                    store.count_seen_events(),
                    ahead,
                )
            )
    finally:
        end()
    ended = time.monotonic()
    held_log = daemon.text()

    produced = producer.join(120)
    wait_until(lambda: store.count_seen_events() >= expected.events, 120, "the rest of the stream")
    back_after = time.monotonic() - ended
    scraped = daemon.scrape()
    assert daemon.stop() == 0, daemon.tail()

    got = tally(settings, group)
    committed = committed_offsets(broker.bootstrap_servers, group, topic)
    figures = (
        f"sent {produced} records ({producer.sends} sends); reference: {expected.events} events, "
        f"{expected.queries} queries, {expected.dead_letters} dead letters, "
        f"{sorted(expected.tally.alert_keys)}; "
        f"outage {ended - began:.1f} s from {stored_at_start} events stored; samples (s, available, stored, "
        f"offsets ahead): {[(round(s.at, 1), s.available, s.stored, s.ahead) for s in samples]}; "
        f"retries counted {scraped.get(UNAVAILABLE_ERRORS)}; all stored {back_after:.1f} s after the outage; "
        f"stored in the end: {got.describe()} {sorted(got.alert_keys)}; checkpoints "
        f"{sorted(got.checkpoints.items())}, broker committed {sorted(committed.items())}; "
        f"daemon: {summary_figures(daemon.text())}"
    )
    print(figures)
    assert len(samples) >= 5, figures
    assert all(sample.ahead == {} for sample in samples), f"offsets ahead of the stored data: {figures}"
    assert {sample.stored for sample in samples} == {stored_at_start}, f"stored during the outage: {figures}"
    assert all(sample.available == 0 for sample in samples[1:]), f"storage reported available: {figures}"
    assert "database unavailable" in held_log and "consumption held" in held_log, daemon.tail()
    assert "partitions revoked" not in held_log, f"the consumer left its group: {daemon.tail()}"
    assert "database available again after" in daemon.text(), daemon.tail()
    assert (scraped.get(UNAVAILABLE_ERRORS) or 0) >= 3 and scraped.get(AVAILABLE) == 1, figures
    assert got.seen_events == expected.events, f"events lost or counted twice: {figures}"
    assert got.queries == expected.queries, f"queries lost or counted twice: {figures}"
    assert got.dead_letters == expected.dead_letters, f"dead letters lost or stored twice: {figures}"
    assert got.alert_keys == expected.tally.alert_keys, f"alerts lost or invented: {figures}"
    assert got.most_open_per_key <= 1, figures
    assert all(committed[key] <= got.checkpoints[key] for key in committed), f"offsets ahead: {figures}"
    assert tracebacks(daemon.text()) == [], daemon.tail()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped after the test (and after its daemon is stopped)."""
    with fresh_postgres_database() as url:
        yield url


@pytest.mark.postgres
def test_postgresql_unreachable_for_30_seconds_mid_stream(
    broker: EmbeddedBroker, postgres_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    parsed = make_url(postgres_url)
    proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432).start()
    request.addfinalizer(proxy.close)
    run_through_outage(
        broker,
        tmp_path,
        request,
        daemon_url=parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(False),
        direct_url=postgres_url,
        begin=proxy.cut,
        end=proxy.restore,
    )


def test_a_sqlite_file_locked_for_30_seconds_mid_stream(
    broker: EmbeddedBroker, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    path = tmp_path / "mia.db"
    url = f"sqlite:///{path}"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        connection.execute("BEGIN IMMEDIATE")  # the write lock, as another writer holding it would
        holder.append(connection)

    def unlock() -> None:
        for connection in holder:
            connection.execute("ROLLBACK")
            connection.close()
        holder.clear()

    request.addfinalizer(unlock)
    run_through_outage(
        broker,
        tmp_path,
        request,
        daemon_url=url,
        direct_url=url,
        begin=lock,
        end=unlock,
        extra_env={"MIA_DATABASE_BUSY_TIMEOUT_SECONDS": "0.5"},
    )
