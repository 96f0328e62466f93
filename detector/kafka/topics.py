"""Topics: creating one with a chosen number of partitions, the way to spread clients over replicas."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient
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
    admin = open_client(KafkaAdminClient, settings)
    try:
        created = False
        if topic not in admin.list_topics():
            try:
                admin.create_topics([NewTopic(topic, partitions, replication_factor)])
                created = True
            except TopicAlreadyExistsError:
                pass  # created by another client in between
        # Described rather than assumed: kafka-python 2.x returns some refusals instead of raising them.
        (description,) = admin.describe_topics([topic])
        if description.get("error_code") or not description["partitions"]:
            raise KafkaError(f"the brokers did not create topic {topic!r}: {description}")
        return TopicLayout(len(description["partitions"]), created)
    finally:
        admin.close()
