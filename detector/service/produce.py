"""`produce`: publish a JSON Lines file to a topic, keyed by client id."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson

from detector.domain import RawRecord
from detector.ingest.jsonl import read_jsonl_batches
from detector.kafka import KafkaPublisher
from detector.settings import Settings


def client_key(line: bytes) -> bytes | None:
    """The Kafka key of a query-log record: its client id, so that a client's events share a partition."""
    try:
        record = orjson.loads(line)
        client_id = record["client"]["id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None  # still produced: the consumer dead-letters it with the precise reason
    return str(client_id).encode() if client_id is not None else None


def produce_file(
    settings: Settings, path: Path, topic: str, progress: Callable[[list[RawRecord]], None] | None = None
) -> int:
    """Publish every non-blank line of a JSON Lines file to `topic`, keyed by client id; return the count."""
    publisher = KafkaPublisher(settings.kafka, max_message_bytes=settings.ingest.max_record_bytes)
    sent = 0
    try:
        for batch in read_jsonl_batches([str(path)], 5000):
            for record in batch:
                publisher.send(topic, record.value, client_key(record.value))
            publisher.flush()
            sent += len(batch)
            if progress is not None:
                progress(batch)
    finally:
        publisher.close()
    return sent
