"""Fault: consumer-group rebalances against the real broker. A second member joins while the first holds
uncommitted results, then leaves again: neither stops the daemon, and no event is lost or counted twice.

Sent: two sample files of 6,000 records each (80 benign clients, none asking enough to be alerted on; one
malformed record in 499: 24 dead letters), the first before the second member joins, the second while both
run. Processed: every event exactly once over both members, as a fault-free replay of the same files counts
them (seen events, queries in sessions, dead letters). De-duplicated: whatever a member reads again after a
rebalance (reported, not bounded: the stored checkpoints make it 0 here). Alerts: none expected (benign
traffic), none stored, no sink configured.

    .venv/bin/pytest tests/faults/test_rebalance.py --basetemp=/tmp/faults-tests -p no:cacheprovider
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from detector.broker import EmbeddedBroker, free_port
from detector.service import produce_file
from detector.simulate.sample import write_sample
from tests.faults.harness import Daemon, daemon_env, reference, summary_figures, tally, tracebacks, wait_until
from tests.support import make_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CONSUMED = 'mia_detector_events_consumed_total{source="kafka"}'


def test_members_joining_and_leaving_while_results_are_uncommitted_lose_nothing(
    broker: EmbeddedBroker, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # With kafka-python 3 the revocation handler committed offsets synchronously from the client's network
    # thread ("Cannot block on net.run()"): the first member died as soon as a second one joined.
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    sent = write_sample(before, clients=80, events=6_000, malformed_every=499, seed=1)
    sent += write_sample(after, clients=80, events=6_000, malformed_every=499, seed=2)
    expected = reference([before, after], tmp_path)
    assert expected.records == sent == 12_000 and expected.tally.alerts == 0
    settings = make_settings(database_url, broker)
    topic, group = settings.kafka.topics[0], settings.kafka.group_id
    produce_file(settings, before, topic)
    env = daemon_env(
        database_url,
        broker.bootstrap_servers,
        MIA_KAFKA_MAX_POLL_RECORDS="200",
        # The first member never commits on its own: whatever it has read is uncommitted when the group
        # rebalances, and only its revocation handler can make it durable.
        MIA_COMMIT_MIN_RECORDS="10000000",
        MIA_COMMIT_MIN_INTERVAL_SECONDS="3600",
    )
    args = ["--topic", topic, "--group-id", group]
    port = free_port()
    first = Daemon(
        args,
        env | {"MIA_METRICS_ADDR": f"127.0.0.1:{port}"},
        tmp_path / "first.log",
        request,
        metrics_port=port,
    )
    wait_until(lambda: "partitions assigned" in first.text(), 60, "the first member's assignment")
    time.sleep(1.0)
    assert tally(settings).seen_events == 0, "the first member committed by itself; nothing would be tested"

    second = Daemon(args, env | {"MIA_COMMIT_MIN_RECORDS": "500"}, tmp_path / "second.log", request)
    wait_until(lambda: first.text().count("partitions revoked") >= 1, 60, "a rebalance")
    wait_until(lambda: "partitions assigned" in second.text(), 60, "the second member's assignment")
    assert first.alive, first.tail()
    # Stored at the revocation: everything the first member had read, with its checkpoints.
    stored_at_join = tally(settings).seen_events
    assert stored_at_join > 0, "the first member's revocation stored nothing of what it had read"
    produce_file(settings, after, topic)  # read by both members

    time.sleep(2.0)
    # Counted before the second member leaves: the embedded broker now and then gives the joiner its share
    # and the first member none until the next rebalance, so the first may have been assigned once or twice.
    assigned = first.text().count("partitions assigned")
    assert second.stop() == 0, second.tail()  # a member leaving: the first gets its partitions back
    wait_until(lambda: first.text().count("partitions assigned") > assigned, 60, "the last rebalance")
    # What the first member reads from here on it stores when it stops (it never commits by itself): wait
    # until the two members have read every record sent, then stop it. Nothing is read twice here (each
    # member resumes a partition where the other stored it), so the count is exact.
    (read_by_second,) = (int(line.split()[0]) for line in summary_figures(second.text()))
    wait_until(
        lambda: first.metric(CONSUMED, 0) + read_by_second >= sent, 120, "the first member to read the rest"
    )
    assert first.stop() == 0, first.tail()

    got = tally(settings, group)
    figures = (
        f"sent {sent} records; reference: {expected.events} events, {expected.queries} queries, "
        f"{expected.dead_letters} dead letters; stored at the first rebalance: {stored_at_join} events; "
        f"stored in the end: {got.describe()}; members: {summary_figures(first.text() + second.text())}"
    )
    print(figures)
    assert "stopped: 0 records" not in second.text(), f"the second member took no part: {figures}"
    assert got.seen_events == expected.events, f"events lost or counted twice: {figures}"
    assert got.queries == expected.queries, f"queries lost or counted twice: {figures}"
    assert got.dead_letters == expected.dead_letters, f"dead letters lost or stored twice: {figures}"
    assert got.alerts == 0, f"alerts on benign traffic: {figures}"
    for member in (first, second):
        assert tracebacks(member.text()) == [], member.tail()
