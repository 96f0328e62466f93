"""Fault: a broker that keeps its log becomes unreachable for 15 s mid-stream, then comes back.

The broker (tansu) advertises the address of a TCP proxy (`tests/tcpproxy.py`), so that every connection of
the daemon and of the producer goes through it; cutting the proxy resets them all and refuses new ones, as a
network partition or a broker restart that keeps its log looks to the clients. The daemon must report the
loss (`mia_detector_broker_connected` 0, a warning) and its end, stay up, and go on where it stopped:
whatever it had read before the cut is stored (the database is not cut), its offset commits to the broker
fail meanwhile (`mia_detector_offset_commit_failures_total`), and it resumes at the positions stored with the
results after it rejoins its group.

Sent: 6,000 records over about 30 s (40 benign clients, 12 malformed); the producer goes through the proxy
too, and publishes a slice that failed during the cut again (a record it had sent before the failure is
then in the topic twice). Processed: every event once, as a fault-free replay of the same file counts them.
De-duplicated: the records published twice, and whatever was read again after the group was rejoined
(reported). Alerts: those of the reference (a benign client that asks for many probabilities), no sink.

    .venv/bin/pytest tests/faults/test_broker_unreachable.py --basetemp=/tmp/faults-tests -p no:cacheprovider
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from detector.broker import free_port
from detector.simulate.sample import write_sample
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
)
from tests.secured_broker import start_tansu, stop
from tests.support import make_settings
from tests.tcpproxy import TcpProxy

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CUT_SECONDS = 15.0
CONNECTED = "mia_detector_broker_connected"
DISCONNECTIONS = "mia_detector_broker_disconnections_total"
COMMIT_FAILURES = "mia_detector_offset_commit_failures_total"


def test_a_broker_unreachable_for_15_seconds_mid_stream_loses_and_duplicates_nothing(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    events = tmp_path / "events.jsonl"
    sent = write_sample(events, clients=40, events=6_000, malformed_every=499, seed=3)
    expected = reference([events], tmp_path)
    listen = free_port()
    proxy = TcpProxy("127.0.0.1", listen).start()
    request.addfinalizer(proxy.close)
    broker = start_tansu(listen, proxy.port, tmp_path / "tansu.log")
    request.addfinalizer(lambda: stop(broker))
    bootstrap = f"127.0.0.1:{proxy.port}"
    url = f"sqlite:///{tmp_path / 'mia.db'}"
    settings = make_settings(url, kafka={"bootstrap_servers": bootstrap})
    topic, group = settings.kafka.topics[0], settings.kafka.group_id
    store = open_store(settings)
    request.addfinalizer(store.close)
    producer = LiveProducer(settings, [events], 30.0).start(request)
    port = free_port()
    env = daemon_env(
        url,
        bootstrap,
        MIA_METRICS_ADDR=f"127.0.0.1:{port}",
        MIA_KAFKA_MAX_POLL_RECORDS="200",
        # Results are stored every 2 s: some are read before the cut and stored during it.
        MIA_COMMIT_MIN_RECORDS="1000",
        MIA_COMMIT_MIN_INTERVAL_SECONDS="2",
    )
    daemon = Daemon(["--topic", topic, "--group-id", group], env, tmp_path / "daemon.log", request, port)
    wait_until(lambda: store.count_seen_events() >= expected.events * 0.3, 90, "a third of the stream")
    time.sleep(1.0)  # records read since the last commit are pending when the cut comes

    proxy.cut()
    cut_at, stored_at_cut = time.monotonic(), store.count_seen_events()
    wait_until(lambda: daemon.metric(CONNECTED) == 0, 10, "the daemon to report the broker unreachable")
    time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
    stored_during_cut = store.count_seen_events() - stored_at_cut
    assert daemon.alive, daemon.tail()
    proxy.restore()
    restored_at = time.monotonic()

    produced = producer.join(120)
    wait_until(lambda: store.count_seen_events() >= expected.events, 120, "the rest of the stream")
    resumed_after = time.monotonic() - restored_at
    scraped = daemon.scrape()
    assert daemon.stop() == 0, daemon.tail()

    got = tally(settings, group)
    committed = committed_offsets(bootstrap, group, topic)
    figures = (
        f"sent {sent} records ({produced} published, {producer.sends} sends); reference: {expected.events} "
        f"events, {expected.queries} queries, {expected.dead_letters} dead letters; proxy cut for "
        f"{restored_at - cut_at:.1f} s with {stored_at_cut} events stored, {stored_during_cut} more stored "
        f"during the cut; all stored {resumed_after:.1f} s after the restore; metrics: disconnections "
        f"{scraped.get(DISCONNECTIONS)}, offset commits refused {scraped.get(COMMIT_FAILURES)}; stored in "
        f"the end: {got.describe()}; checkpoints {sorted(got.checkpoints.items())}, broker committed "
        f"{sorted(committed.items())}; daemon: {summary_figures(daemon.text())}"
    )
    print(figures)
    log = daemon.text()
    assert "lost the Kafka brokers at" in log, daemon.tail()
    assert "connected to the Kafka brokers again" in log, daemon.tail()
    assert (scraped.get(DISCONNECTIONS) or 0) >= 1 and scraped.get(CONNECTED) == 1, figures
    assert stored_during_cut > 0, f"nothing was pending at the cut; nothing was tested: {figures}"
    assert got.seen_events == expected.events, f"events lost or counted twice: {figures}"
    assert got.queries == expected.queries, f"queries lost or counted twice: {figures}"
    assert got.dead_letters == expected.dead_letters, f"dead letters lost or stored twice: {figures}"
    assert got.alert_keys == expected.tally.alert_keys, f"alerts lost or invented: {figures}"
    assert all(committed[key] <= got.checkpoints[key] for key in committed), f"offsets ahead: {figures}"
    assert tracebacks(log) == [], daemon.tail()
