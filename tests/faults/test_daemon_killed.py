"""Fault: the daemon (`python -m detector run`) is SIGKILLed three times mid-stream and started again, on
SQLite and on PostgreSQL, while live traffic opens alerts that a webhook receives.

Sent: 7,080 records over about 40 s: 6,000 benign records of 40 clients over a simulated hour (12 malformed:
dead letters) and four augmentation probers of 270 records each, spread over that hour. Processed: every
event exactly once, as a fault-free `replay` of the same file counts them (seen events, queries in sessions,
dead letters). De-duplicated: what each restart reads again after the last commit of the killed run
(reported from the daemons' /metrics and summaries; not bounded, since it depends on where the kill fell).

Alerts expected: one `augmentation_probing` alert per prober, as in the reference (4 keys), each detected
after the same number of the prober's queries as in the reference: a restarted daemon goes on from the
client features stored with the last commit of the killed one, so a prober whose traffic a restart splits
is judged on all of it. No key has two alerts open at once.

Notifications: every outbox row is delivered, and the receiver took each idempotency key once; a key may
arrive twice only when its delivery was in flight at a kill (the receiver answered, the process died before
it wrote "delivered"): the webhook's `Idempotency-Key` header exists for exactly that, and the test
reports how often it happened.

    .venv/bin/pytest tests/faults/test_daemon_killed.py --basetemp=/tmp/faults-tests -p no:cacheprovider
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from detector.broker import EmbeddedBroker, free_port
from detector.kafka import ensure_topic
from detector.storage import DeliveryStatus, Store, open_store
from tests.faults.harness import (
    Daemon,
    LiveProducer,
    daemon_env,
    outbox_of,
    reference,
    summary_figures,
    tally,
    tracebacks,
    wait_until,
    write_traffic,
)
from tests.receivers import RecordedRequest, RecordingReceiver
from tests.support import make_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

KILLS = 3
# After each threshold is reached: a kill at a different moment of the commit interval each time.
KILL_DELAYS = (0.5, 1.0, 1.5)
STREAM_SECONDS = 40.0
# A key delivered twice is explained by a kill when its first delivery was answered this shortly before it.
IN_FLIGHT_SECONDS = 2.0
CONSUMED = 'mia_detector_events_consumed_total{source="kafka"}'
# How long a kill waits, at most, for the run to have read records it has not stored yet.
AHEAD_SECONDS = 3.0


class ArrivalLog:
    """A receiver's validator that notes when each idempotency key arrived (and accepts every request)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.arrivals: list[tuple[str, float]] = []

    def __call__(self, request: RecordedRequest) -> str | None:
        with self._lock:
            self.arrivals.append((request.headers.get("idempotency-key", ""), time.monotonic()))
        return None

    def first(self, key: str) -> float:
        with self._lock:
            return min(at for arrived, at in self.arrivals if arrived == key)


def read_by(daemon: Daemon) -> tuple[float, float]:
    """Records a run read and duplicates it skipped, as its /metrics last said."""
    return (daemon.metric(CONSUMED), daemon.metric("mia_detector_duplicate_events_total"))


def read_ahead(daemon: Daemon, store: Store, stored_before: int) -> float:
    """The records `daemon` has read, once (within `AHEAD_SECONDS`) it has read some that are not stored
    yet: a kill then finds work pending, which a kill just after a commit would not."""
    deadline = time.monotonic() + AHEAD_SECONDS
    while True:
        read = daemon.scrape()[CONSUMED]
        stored = store.count_seen_events() + sum(store.dead_letter_counts().values())
        if read > stored - stored_before or time.monotonic() > deadline:
            return read
        time.sleep(0.05)


def test_a_daemon_killed_three_times_mid_stream_loses_and_duplicates_nothing(
    broker: EmbeddedBroker, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    traffic = write_traffic(tmp_path / "events.jsonl", benign_events=6_000, probers=4)
    expected = reference([traffic.path], tmp_path)
    assert len(expected.tally.alert_keys) == 4, f"the reference opened {sorted(expected.tally.alert_keys)}"
    arrivals = ArrivalLog()
    webhook = RecordingReceiver(validate=arrivals)
    request.addfinalizer(webhook.stop)
    settings = make_settings(database_url, broker)
    topic, group = settings.kafka.topics[0], settings.kafka.group_id
    store = open_store(settings)
    request.addfinalizer(store.close)
    env = daemon_env(
        database_url,
        broker.bootstrap_servers,
        MIA_WEBHOOK_URL=f"{webhook.url}/hook",
        MIA_KAFKA_MAX_POLL_RECORDS="200",
        # A commit every 2 s or 1,000 records, while a slice of records arrives every second: a kill finds
        # records read and not yet stored.
        MIA_COMMIT_MIN_RECORDS="1000",
        MIA_COMMIT_MIN_INTERVAL_SECONDS="2",
        # Alerts resolve and re-notify within the run, so that more notifications are in flight.
        MIA_ALERTS_RESOLVE_AFTER_SECONDS="600",
        MIA_ALERTS_RENOTIFY_SECONDS="1",
        MIA_ALERTS_RETRY_INITIAL_SECONDS="0.2",
        MIA_ALERTS_RETRY_MAX_SECONDS="1",
    )
    args = ["--topic", topic, "--group-id", group]
    # One partition: the records are read in the file's order, as the reference replay reads them. Without
    # a scoring model the input scale is learned from the first queries of the stream, in their order.
    ensure_topic(settings.kafka, topic, 1)
    producer = LiveProducer(settings, [traffic.path], STREAM_SECONDS).start(request)

    runs: list[Daemon] = []
    kills: list[tuple[float, int]] = []  # (when, events stored then)
    pending: list[int] = []  # records the killed run had read and not stored
    stored_before = 0  # records stored (events and dead letters) when the run started
    for kill in range(KILLS):
        port = free_port()
        metrics = {"MIA_METRICS_ADDR": f"127.0.0.1:{port}"}
        daemon = Daemon(args, env | metrics, tmp_path / f"run{kill}.log", request, metrics_port=port)
        runs.append(daemon)
        threshold = expected.events * (kill + 1) // (KILLS + 1)

        def stored_or_exited(daemon: Daemon = daemon, threshold: int = threshold) -> bool:
            # Serving its metrics too: the run before may have stored past this threshold already, and a
            # run still starting has no /metrics to read what it has read ahead from.
            stored = store.count_seen_events() >= threshold and bool(daemon.last_scrape)
            return stored or not daemon.alive

        wait_until(stored_or_exited, 120, f"run {kill + 1} to store {threshold} events")
        assert daemon.alive, f"run {kill + 1} exited by itself:\n{daemon.tail()}"
        time.sleep(KILL_DELAYS[kill])  # a different moment between two commits each time
        read = read_ahead(daemon, store, stored_before)
        daemon.kill()
        kills.append((time.monotonic(), store.count_seen_events()))
        records_stored = kills[-1][1] + sum(store.dead_letter_counts().values())
        pending.append(int(read) - (records_stored - stored_before))
        stored_before = records_stored
    final = Daemon([*args, "--exit-when-idle", "8"], env, tmp_path / "final.log", request)
    runs.append(final)
    sent = producer.join(120)
    assert final.wait(240) == 0, final.tail()

    got = tally(settings, group)
    outbox = outbox_of(settings)
    request.addfinalizer(outbox.engine.dispose)
    queued = outbox.list(limit=100_000)
    keys = [entry.notification.idempotency_key for entry in queued]
    accepted = Counter(r.headers.get("idempotency-key", "") for r in webhook.accepted)
    twice = sorted(key for key, count in accepted.items() if count > 1)
    explained = [
        key for key in twice if any(0 <= at - arrivals.first(key) <= IN_FLIGHT_SECONDS for at, _ in kills)
    ]
    figures = (
        f"sent {sent} records ({producer.sends} sends); reference: {expected.events} events, "
        f"{expected.queries} queries, {expected.dead_letters} dead letters, "
        f"{expected.tally.alerts} alerts {sorted(expected.tally.alert_keys)}; "
        f"killed with {[stored for _, stored in kills]} events stored, {pending} records read not stored; "
        f"killed runs last scraped (records read, duplicates skipped): {[read_by(r) for r in runs[:-1]]}; "
        f"final run: {summary_figures(final.text())}; "
        f"stored: {got.describe()} {sorted(got.alert_keys)}; notifications queued {len(queued)}, "
        f"delivered {sum(e.status is DeliveryStatus.DELIVERED for e in queued)}, receiver took "
        f"{sum(accepted.values())} requests for {len(accepted)} keys, twice: {len(twice)} "
        f"(in flight at a kill: {len(explained)})"
    )
    print(figures)
    assert sum(pending) > 0, f"no kill found work pending; nothing was tested: {figures}"
    assert got.seen_events == expected.events, f"events lost or counted twice: {figures}"
    assert got.queries == expected.queries, f"queries lost or counted twice: {figures}"
    assert got.dead_letters == expected.dead_letters, f"dead letters lost or stored twice: {figures}"
    assert got.alert_keys == expected.tally.alert_keys, f"alerts lost or invented: {figures}"
    detected = f"{sorted(got.detections.items())} != {sorted(expected.tally.detections.items())}"
    assert got.detections == expected.tally.detections, f"alerts detected at other queries: {detected}"
    assert got.most_open_per_key <= 1, f"two alerts open for one key: {figures}"
    assert queued and all(e.status is DeliveryStatus.DELIVERED for e in queued), f"undelivered: {figures}"
    assert len(set(keys)) == len(keys), f"a notification queued twice: {figures}"
    assert set(accepted) == set(keys), f"the receiver's keys differ from the outbox's: {figures}"
    assert twice == explained, f"delivered twice without a kill in flight: {figures}"
    for daemon in runs:
        assert tracebacks(daemon.text()) == [], daemon.tail()
