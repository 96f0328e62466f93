"""Kafka clients shared by the source (`detector.ingest.kafka`) and the sinks that write to a topic: options
and connection checks from the settings (`clients`, `connect`), and the publisher of whole records."""

from detector.kafka.clients import (
    BOOTSTRAP_TIMEOUT_OPTION,
    KafkaPublisher,
    client_options,
    open_client,
    open_connections,
)
from detector.kafka.connect import KafkaUnreachable, check_connection

__all__ = [
    "BOOTSTRAP_TIMEOUT_OPTION",
    "KafkaPublisher",
    "KafkaUnreachable",
    "check_connection",
    "client_options",
    "open_client",
    "open_connections",
]
