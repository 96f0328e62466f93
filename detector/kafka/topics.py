"""Topics: creating one with a chosen number of partitions, the way to spread clients over replicas."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer
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
    settings: KafkaSettings, topic: str, partitions: int, replication_factor: int = BROKER_DEFAULT_REPLICATION
) -> TopicLayout:
    """Create `topic` with `partitions` partitions (and `replication_factor`, by default the brokers') when
    it is absent; an existing topic is left as it is. Returns its layout; raises `KafkaUnreachable` when no
    broker answers and `KafkaError` when the brokers refuse to create it."""
    # Metadata through a consumer, not the admin client: kafka-python 2.x's admin metadata call fails on
    # authorised-operation values it does not know (which recent brokers send).
    consumer = open_client(KafkaConsumer, settings)
    try:
        if topic in consumer.topics():
            return TopicLayout(len(consumer.partitions_for_topic(topic) or ()), created=False)
        admin = open_client(KafkaAdminClient, settings)
        try:
            admin.create_topics([NewTopic(topic, partitions, replication_factor)])
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
