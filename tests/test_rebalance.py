"""Consumer-group rebalances against the real broker: a member joining or leaving while another holds
uncommitted results neither stops the daemon nor loses or double-counts an event."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from detector.broker import EmbeddedBroker
from detector.service import produce_file, replay
from detector.simulate.sample import write_sample
from detector.storage import open_store
from tests.support import make_settings
from tests.test_cli import cli_env, start, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_members_joining_and_leaving_while_results_are_uncommitted_lose_nothing(
    broker: EmbeddedBroker, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # With kafka-python 3 the revocation handler committed offsets synchronously from the client's network
    # thread ("Cannot block on net.run()"): the first member died as soon as a second one joined.
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    write_sample(before, clients=40, events=6_000, malformed_every=499, seed=1)
    write_sample(after, clients=40, events=6_000, malformed_every=499, seed=2)
    total = 12_000
    settings = make_settings(database_url, broker)
    topic, group = settings.kafka.topics[0], settings.kafka.group_id
    produce_file(settings, before, topic)
    store = open_store(settings)
    request.addfinalizer(store.close)
    env = cli_env(
        MIA_DATABASE_URL=database_url,
        MIA_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        MIA_KAFKA_SESSION_TIMEOUT_MS="6000",
        MIA_KAFKA_MAX_POLL_RECORDS="200",
        # The first member never commits on its own: whatever it has read is uncommitted when the group
        # rebalances, and only its revocation handler can make it durable.
        MIA_COMMIT_MIN_RECORDS="10000000",
        MIA_COMMIT_MIN_INTERVAL_SECONDS="3600",
        MIA_LOG_LEVEL="INFO",
        MIA_METRICS_ADDR="",
    )
    args = ("run", "--topic", topic, "--group-id", group)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start(*args, env=env, log=first_log)
    request.addfinalizer(lambda: _stop(first))
    wait_for(lambda: "partitions assigned" in first_log.read_text(), 60, "the first member's assignment")
    time.sleep(1.0)
    assert store.count_seen_events() == 0, "the first member committed by itself; nothing would be tested"

    second = start(*args, env=env | {"MIA_COMMIT_MIN_RECORDS": "500"}, log=second_log)
    request.addfinalizer(lambda: _stop(second))
    wait_for(lambda: first_log.read_text().count("partitions revoked") >= 1, 60, "a rebalance")
    wait_for(lambda: "partitions assigned" in second_log.read_text(), 60, "the second member's assignment")
    assert first.poll() is None, first_log.read_text()
    # Stored at the revocation: everything the first member had read, with its checkpoints.
    assert store.count_seen_events() > 0
    produce_file(settings, after, topic)  # read by both members

    time.sleep(2.0)
    second.send_signal(signal.SIGTERM)  # a member leaving: the first one gets its partitions back
    assert second.wait(60) == 0, second_log.read_text()
    wait_for(lambda: first_log.read_text().count("partitions assigned") >= 3, 60, "the last rebalance")
    wait_for(lambda: store.count_seen_events() >= total * 0.99, 120, "the rest of the stream")
    time.sleep(2.0)
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0, first_log.read_text()

    assert "stopped: 0 records" not in second_log.read_text()  # the second member did take part
    reference = replay(make_settings(f"sqlite:///{tmp_path / 'expected.db'}"), [str(before), str(after)])
    assert store.count_seen_events() == reference.events
    assert sum(s.queries for s in store.list_sessions(limit=100_000)) == reference.queries
    assert sum(store.dead_letter_counts().values()) == sum(reference.dead_letters.values())
    for log in (first_log, second_log):
        assert "Traceback" not in log.read_text()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
