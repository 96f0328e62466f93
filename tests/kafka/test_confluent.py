"""`ConfluentConsumer` against the embedded broker: what its close promises."""

from __future__ import annotations

import time

import pytest

from detector.broker import EmbeddedBroker
from detector.kafka import ensure_topic
from detector.kafka.confluent import ConfluentConsumer
from detector.kafka.consumers import Partition
from tests.support import make_settings

pytestmark = pytest.mark.kafka

PARTITIONS = 4
# Long past the group's first rebalance on the embedded broker (about 3 s): by then librdkafka has queued the
# assignment for the application, which only a poll (or `close`) serves.
ASSIGNMENT_QUEUED_SECONDS = 8


def test_a_member_closed_with_an_assignment_queued_leaves_the_group_without_calling_the_hooks(
    broker: EmbeddedBroker,
) -> None:
    settings = make_settings("sqlite://", broker, kafka={"client": "confluent"})
    topic = settings.kafka.topics[0]
    ensure_topic(settings.kafka, topic, PARTITIONS)
    hooks: list[tuple[str, list[Partition]]] = []
    leaving = ConfluentConsumer(settings.kafka, settings.kafka.group_id)
    leaving.subscribe(
        [topic],
        revoked=lambda partitions: hooks.append(("revoked", partitions)),
        assigned=lambda partitions: hooks.append(("assigned", partitions)),
    )
    time.sleep(ASSIGNMENT_QUEUED_SECONDS)  # without a poll

    leaving.close()

    # Nothing reached the pipeline's hooks: the partitions were never its own.
    assert hooks == []
    # And the member left the group: the next one is given every partition well before the session of the
    # one that closed could have timed out.
    staying = ConfluentConsumer(settings.kafka, settings.kafka.group_id)
    staying.subscribe([topic], revoked=lambda partitions: None, assigned=lambda partitions: None)
    try:
        deadline = time.monotonic() + settings.kafka.session_timeout_ms / 1000
        while len(staying.assignment()) < PARTITIONS:
            assert time.monotonic() < deadline, f"assigned {sorted(staying.assignment())}"
            staying.poll(100, 10)
    finally:
        staying.close()
