"""The risk feed as a compacted Kafka topic (`MIA_RISK_TOPIC`), so that gateways and model servers keep a
local copy: one record per client whose decision in force changed, keyed by the JSON array `[model,
client]`, its value the document the endpoint answers (`risk_document`); a tombstone when the client goes
back to `allow` (its alert resolved, its decision expired or cleared). Multiple replicas publish the same
documents from the same database: a compacted topic keeps the latest, whichever wrote it.

At start the topic is read to its end, so that what an earlier process published and is no longer in force
gets its tombstone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import orjson

from detector.alerts.risk_feed import InForce
from detector.metrics import Metrics

# What the topic is created with when absent: keys compacted to their latest value, tombstones kept a day
# (a gateway that was down for less than that still sees a key go).
TOPIC_CONFIGS = {"cleanup.policy": "compact", "delete.retention.ms": str(24 * 3600 * 1000)}


class RecordPublisher(Protocol):
    """Where the records go (`detector.kafka.KafkaPublisher`)."""

    def send(self, topic: str, value: bytes | None, key: bytes | None) -> None: ...

    def flush(self, timeout: float | None = 30.0) -> None: ...


def risk_key(model: str, client_id: str) -> bytes:
    """The record key of a client: the JSON array `[model, client_id]`."""
    return orjson.dumps([model, client_id])


class RiskTopic:
    """Publishes what changed in the decisions in force (`RiskView.in_force`) since the last call to `topic`
    through `publisher`; `published` is what the topic holds already (`detector.kafka.latest_values`).
    `metrics` count the records published."""

    def __init__(
        self,
        publisher: RecordPublisher,
        topic: str,
        published: Mapping[bytes, bytes],
        metrics: Metrics | None = None,
    ) -> None:
        self._publisher = publisher
        self.topic = topic
        self._published = dict(published)
        self._metrics = metrics or Metrics()

    def __str__(self) -> str:
        return f"publishing to risk topic {self.topic}"

    def __call__(self, in_force: InForce) -> None:
        """Send a record for every client whose document in `in_force` changed, a tombstone for every client
        no longer in it; flush. What is published is remembered only once the flush succeeded."""
        current = {risk_key(*key): orjson.dumps(document) for key, document in in_force.items()}
        changed = {key: value for key, value in current.items() if self._published.get(key) != value}
        gone = [key for key in self._published if key not in current]
        if not changed and not gone:
            return
        for key, value in changed.items():
            self._publisher.send(self.topic, value, key)
        for key in gone:
            self._publisher.send(self.topic, None, key)
        self._publisher.flush()
        self._published = current
        self._metrics.risk_published.labels(record="decision").inc(len(changed))
        self._metrics.risk_published.labels(record="tombstone").inc(len(gone))
