"""Topics: creating one with a chosen number of partitions (the way to spread clients over replicas) and
settings (a compacted one), and reading a compacted topic's latest value of every key."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from detector.kafka.clients import open_client
from detector.settings import KafkaSettings

# The brokers' own `default.replication.factor` (CreateTopics v4 and later: Apache Kafka 2.4 on).
BROKER_DEFAULT_REPLICATION = -1


@dataclass(frozen=True)
class TopicLayout:
    """A topic's partition count, and whether this call created it."""

    partitions: int
    created: bool


def ensure_topic(
    settings: KafkaSettings,
    topic: str,
    partitions: int,
    replication_factor: int = BROKER_DEFAULT_REPLICATION,
    configs: Mapping[str, str] | None = None,
) -> TopicLayout:
    """Create `topic` with `partitions` partitions (and `replication_factor`, by default the brokers', and
    the topic `configs`, such as `cleanup.policy`) when it is absent; an existing topic is left as it is.
    Returns its layout; raises `KafkaUnreachable` when no broker answers and `KafkaError` when the brokers
    refuse to create it."""
    # Metadata through a consumer, not the admin client: kafka-python 2.x's admin metadata call fails on
    # authorised-operation values it does not know (which recent brokers send).
    consumer = open_client(KafkaConsumer, settings)
    try:
        if topic in consumer.topics():
            return TopicLayout(len(consumer.partitions_for_topic(topic) or ()), created=False)
        admin = open_client(KafkaAdminClient, settings)
        try:
            new = NewTopic(topic, partitions, replication_factor, topic_configs=dict(configs or {}))
            admin.create_topics([new])
            created = True
        except TopicAlreadyExistsError:
            created = False  # created by another client in between
        finally:
            admin.close()
        # Read back rather than assumed: kafka-python 2.x returns some refusals instead of raising them.
        deadline = time.monotonic() + settings.connect_timeout_seconds
        while topic not in consumer.topics():
            if time.monotonic() > deadline:
                raise KafkaError(f"the brokers did not create topic {topic!r}")
            time.sleep(0.1)
        return TopicLayout(len(consumer.partitions_for_topic(topic) or ()), created)
    finally:
        consumer.close()


def latest_values(settings: KafkaSettings, topic: str) -> dict[bytes, bytes]:
    """The latest value of every key of `topic` (read from its beginning to its end now), keys whose latest
    record is a tombstone left out: what a compacted topic holds. Raises `KafkaUnreachable` when no broker
    answers."""
    consumer = open_client(KafkaConsumer, settings, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return {}
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        latest: dict[bytes, bytes | None] = {}
        deadline = time.monotonic() + settings.connect_timeout_seconds * 4
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise KafkaError(f"topic {topic!r} not read to its end in time")
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    if record.key is not None:
                        latest[record.key] = record.value
        return {key: value for key, value in latest.items() if value is not None}
    finally:
        consumer.close()
