"""Kafka clients shared by the source (`detector.ingest.kafka`) and the sinks that write to a topic: options
and connection checks from the settings (`clients`, `connect`), the consumer-group clients (`consumers`,
`confluent`), and the publisher of whole records."""

from detector.kafka.clients import (
    BOOTSTRAP_TIMEOUT_OPTION,
    KafkaPublisher,
    client_options,
    message_limit,
    open_client,
    open_connections,
)
from detector.kafka.connect import KafkaUnreachable, check_connection
from detector.kafka.consumers import GroupConsumer, open_consumer
from detector.kafka.topics import TopicLayout, ensure_topic, latest_values

__all__ = [
    "BOOTSTRAP_TIMEOUT_OPTION",
    "GroupConsumer",
    "KafkaPublisher",
    "KafkaUnreachable",
    "TopicLayout",
    "check_connection",
    "client_options",
    "ensure_topic",
    "latest_values",
    "message_limit",
    "open_client",
    "open_connections",
    "open_consumer",
]
