"""Fault: a member of the consumer group loses its partition without knowing it, and comes back holding
results it read and never stored (a long stop-the-world pause, a frozen VM or a network partition does this;
here SIGSTOP, past the session timeout, then SIGCONT). Meanwhile a second member took the partition over and
stored everything. The stale member's commit, made when its client notices the lost membership, must be
refused (fencing): without it, its older checkpoint, sessions and client features would be written over the
new owner's, and the records after them would never be counted (they are de-duplicated when read again).

Sent, into a 1-partition topic: 4,000 benign records of 40 clients over a simulated hour and two augmentation
probers of 270 records each, starting a third and two thirds into the hour. The records before the first
prober's are read by the first member and never stored by it (it commits neither by count nor by time, and
no alert makes it); the rest are sent while it is stopped. Expected, as a fault-free replay of the same
records gives them: every event stored once, the queries counted in sessions, the dead letters, the
checkpoint at the end of the partition, and each alert's key with the queries it was detected after. The
stale member logs the refused commit and rejoins the group; no member logs a traceback.

    .venv/bin/pytest tests/faults/test_stale_member.py --basetemp=/tmp/faults-tests -p no:cacheprovider
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from detector.broker import EmbeddedBroker, free_port
from detector.kafka import ensure_topic
from detector.service import produce_file
from tests.faults.harness import Daemon, daemon_env, reference, tally, tracebacks, wait_until, write_traffic
from tests.support import make_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CONSUMED = 'mia_detector_events_consumed_total{source="kafka"}'


def lines(path: Path) -> int:
    return len(path.read_bytes().splitlines())


def split_before_first_prober(path: Path, directory: Path) -> tuple[Path, Path]:
    """`path` as two files: its records before the first prober's (benign only: read by the first member,
    no alert makes it commit), and the rest."""
    records = path.read_bytes().splitlines(keepends=True)
    first = next(index for index, line in enumerate(records) if b'"prober-' in line)
    before, after = directory / "before.jsonl", directory / "after.jsonl"
    before.write_bytes(b"".join(records[:first]))
    after.write_bytes(b"".join(records[first:]))
    return before, after


def test_a_member_that_lost_its_partition_while_stopped_cannot_store_over_the_new_owner(
    broker: EmbeddedBroker, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    traffic = write_traffic(tmp_path / "events.jsonl", benign_events=4_000, probers=2)
    expected = reference([traffic.path], tmp_path)
    assert len(expected.tally.alert_keys) == 2, f"the reference opened {sorted(expected.tally.alert_keys)}"
    settings = make_settings(database_url, broker)
    topic, group = settings.kafka.topics[0], settings.kafka.group_id
    ensure_topic(settings.kafka, topic, 1)
    before, after = split_before_first_prober(traffic.path, tmp_path)
    produce_file(settings, before, topic)
    env = daemon_env(database_url, broker.bootstrap_servers, MIA_KAFKA_MAX_POLL_RECORDS="200")
    args = ["--topic", topic, "--group-id", group]

    # The first member never commits by itself: all it reads stays pending.
    port = free_port()
    stale = Daemon(
        args,
        env
        | {
            "MIA_METRICS_ADDR": f"127.0.0.1:{port}",
            "MIA_COMMIT_MIN_RECORDS": "10000000",
            "MIA_COMMIT_MIN_INTERVAL_SECONDS": "3600",
        },
        tmp_path / "stale.log",
        request,
        metrics_port=port,
    )
    wait_until(lambda: stale.metric(CONSUMED, 0) >= lines(before), 60, "the first member to read the file")
    assert tally(settings).seen_events == 0, "the first member stored what it read; nothing would be tested"
    stale.process.send_signal(signal.SIGSTOP)
    request.addfinalizer(lambda: stale.process.send_signal(signal.SIGCONT) if stale.alive else None)

    produce_file(settings, after, topic)
    owner = Daemon(args, env | {"MIA_COMMIT_MIN_RECORDS": "500"}, tmp_path / "owner.log", request)
    wait_until(
        lambda: tally(settings).seen_events >= expected.events, 120, "the new owner to store both files"
    )
    stored_by_owner = tally(settings, group)

    stale.process.send_signal(signal.SIGCONT)
    wait_until(lambda: "commit refused" in stale.text(), 60, "the stale member's commit to be refused")
    wait_until(
        lambda: stale.text().count("partitions assigned") >= 2, 60, "the stale member to rejoin the group"
    )
    time.sleep(2.0)  # whoever holds the partition now reads on from the stored position: nothing is left
    assert stale.stop() == 0, stale.tail()
    assert owner.stop() == 0, owner.tail()

    got = tally(settings, group)
    refused = [line for line in stale.text().splitlines() if "commit refused" in line]
    figures = (
        f"reference: {expected.tally.describe()}; stored by the new owner: {stored_by_owner.describe()}; "
        f"in the end: {got.describe()}, checkpoints {got.checkpoints}; refused: {refused}"
    )
    print(figures)
    assert "claimed by another member" in refused[0], figures
    assert got.checkpoints == {(topic, 0): traffic.records}, figures
    assert got.seen_events == expected.events, figures
    assert got.queries == expected.queries, f"sessions written over by the stale member: {figures}"
    assert got.dead_letters == expected.dead_letters, figures
    assert got.detections == expected.tally.detections, figures
    assert got.most_open_per_key == 1, figures
    for member in (stale, owner):
        assert tracebacks(member.text()) == [], member.tail()
