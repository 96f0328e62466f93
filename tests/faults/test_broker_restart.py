"""Fault: the embedded broker (tansu, memory storage) is SIGKILLed under a running daemon and started again on
the same port, empty: every topic, record and committed offset is gone.

The daemon must notice (`mia_detector_broker_connected` 0, a warning in the log), neither crash nor spin
while the broker is away (its CPU time is measured from /proc), reconnect by itself, notice that the stored
positions lie beyond the new, empty log (`mia_detector_positions_beyond_log_end_total`, a warning) and
consume what is produced after the restart from its first offset.

Sent: 2,000 records before the kill (20 benign clients, 4 malformed), all stored before the kill; 1,500
records after the restart (new event ids). Processed: every event of both, once, as a fault-free replay of
the two files counts them. De-duplicated: none expected (the records after the restart are new; the broker
that had the first ones is gone). Alerts: none expected (benign traffic), no sink configured.

    .venv/bin/pytest tests/faults/test_broker_restart.py --basetemp=/tmp/faults-tests -p no:cacheprovider
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from detector.broker import free_port
from detector.service import produce_file
from detector.settings import Settings
from detector.simulate.sample import write_sample
from detector.storage import open_store
from tests.faults.harness import (
    Daemon,
    cpu_seconds,
    daemon_env,
    reference,
    summary_figures,
    tally,
    tracebacks,
    wait_until,
)
from tests.secured_broker import start_tansu, stop
from tests.support import make_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

DOWN_SECONDS = 15.0
# While the broker is away the client reconnects with backoff: a few hundredths of a CPU second per second
# were measured. A tight retry loop would use a whole core (1 CPU-s per s).
MAX_CPU_SHARE_WHILE_DOWN = 0.1
CONNECTED = "mia_detector_broker_connected"
DISCONNECTIONS = "mia_detector_broker_disconnections_total"
BEYOND_END = "mia_detector_positions_beyond_log_end_total"


def records_stored(settings: Settings) -> int:
    """Records stored so far: events and dead letters."""
    stored = tally(settings)
    return stored.seen_events + stored.dead_letters


def test_a_broker_restarted_empty_is_noticed_and_what_comes_after_is_consumed(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    sent_before = write_sample(before, clients=20, events=2_000, malformed_every=499, seed=1)
    sent_after = write_sample(after, clients=20, events=1_500, malformed_every=499, seed=2)
    expected = reference([before, after], tmp_path)
    port = free_port()
    broker_log = tmp_path / "tansu.log"
    broker = start_tansu(port, port, broker_log)
    request.addfinalizer(lambda: stop(broker))
    bootstrap = f"127.0.0.1:{port}"
    url = f"sqlite:///{tmp_path / 'mia.db'}"
    settings = make_settings(url, kafka={"bootstrap_servers": bootstrap})
    topic, group = settings.kafka.topics[0], settings.kafka.group_id
    produce_file(settings, before, topic)
    open_store(settings).close()  # migrated before the test looks into it
    metrics_port = free_port()
    env = daemon_env(url, bootstrap, MIA_METRICS_ADDR=f"127.0.0.1:{metrics_port}")
    args = ["--topic", topic, "--group-id", group]
    daemon = Daemon(args, env, tmp_path / "daemon.log", request, metrics_port)
    wait_until(lambda: records_stored(settings) >= sent_before, 60, "the records sent before the kill")
    stored_before = tally(settings).seen_events
    wait_until(lambda: daemon.metric(CONNECTED) == 1, 10, "the first scrape")

    broker.kill()
    broker.wait(10)
    killed_at, cpu_at_kill = time.monotonic(), cpu_seconds(daemon.process.pid)
    wait_until(lambda: daemon.metric(CONNECTED) == 0, DOWN_SECONDS, "the daemon to report the broker lost")
    time.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - killed_at)))
    down_for = time.monotonic() - killed_at
    cpu_while_down = cpu_seconds(daemon.process.pid) - cpu_at_kill
    assert daemon.alive, f"the daemon died with the broker:\n{daemon.tail()}"
    lost_log = "lost the Kafka brokers at" in daemon.text()

    broker = start_tansu(port, port, broker_log)
    request.addfinalizer(lambda: stop(broker))
    deadline = time.monotonic() + 60
    while True:  # a restarted tansu answers errors for a few seconds
        try:
            produce_file(settings, after, topic)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    wait_until(
        lambda: tally(settings).seen_events >= expected.events, 120, "the records produced after the restart"
    )
    wait_until(lambda: daemon.metric(CONNECTED) == 1, 10, "the daemon to report the broker back")
    scraped = daemon.scrape()
    assert daemon.stop() == 0, daemon.tail()

    got = tally(settings, group)
    figures = (
        f"sent {sent_before} records before the kill, {sent_after} after the restart; reference: "
        f"{expected.events} events, {expected.queries} queries, {expected.dead_letters} dead letters; "
        f"stored before the kill: {stored_before} events; broker down {down_for:.1f} s, daemon CPU meanwhile "
        f"{cpu_while_down:.2f} s; metrics: connected {scraped.get(CONNECTED)}, disconnections "
        f"{scraped.get(DISCONNECTIONS)}, positions beyond the log end {scraped.get(BEYOND_END)}; "
        f"stored in the end: {got.describe()}; daemon: {summary_figures(daemon.text())}"
    )
    print(figures)
    assert lost_log, f"no warning that the broker was lost: {figures}\n{daemon.tail()}"
    assert cpu_while_down <= MAX_CPU_SHARE_WHILE_DOWN * down_for, f"the daemon spun: {figures}"
    assert "connected to the Kafka brokers again" in daemon.text(), daemon.tail()
    assert "beyond the broker's end offset" in daemon.text(), daemon.tail()
    assert (scraped.get(DISCONNECTIONS) or 0) >= 1 and (scraped.get(BEYOND_END) or 0) >= 1, figures
    assert got.seen_events == expected.events, f"events lost or counted twice: {figures}"
    assert got.queries == expected.queries, f"queries lost or counted twice: {figures}"
    assert got.dead_letters == expected.dead_letters, f"dead letters lost or stored twice: {figures}"
    assert got.alerts == 0, figures
    assert tracebacks(daemon.text()) == [], daemon.tail()
