"""Consumer-group clients behind one interface (`GroupConsumer`), so that the source
(`detector.ingest.kafka.KafkaSource`) keeps its claims, positions and connection watch in one place whichever
client reads: kafka-python (the default) or confluent-kafka (`MIA_KAFKA_CLIENT=confluent`,
`detector.kafka.confluent`). Partitions are `(topic, partition)` pairs; failures are kafka-python's
`KafkaError`, with its `retriable` flag, from either client."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from detector.domain import Origin, RawRecord
from detector.kafka.clients import BOOTSTRAP_TIMEOUT_OPTION, open_client, open_connections
from detector.settings import KafkaSettings

log = logging.getLogger(__name__)

Partition = tuple[str, int]  # (topic, partition)
RebalanceHook = Callable[[list[Partition]], None]
# Bounds the broker lookups of end and committed offsets (kafka-python 2.x uses its request timeout).
OFFSETS_TIMEOUT_MS = 10_000


class GroupConsumer(Protocol):
    """A consumer in a group with manual commits. The rebalance hooks run inside `poll`; under kafka-python
    3 on its network thread, where no call may wait for the broker."""

    def subscribe(self, topics: list[str], revoked: RebalanceHook, assigned: RebalanceHook) -> None:
        """Join the group for `topics`; `revoked` runs before partitions go, `assigned` once they come."""
        ...

    def unsubscribe(self) -> None:
        """Leave the group's assignment (a later `subscribe` joins again)."""
        ...

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        """Up to `max_records` records, waiting at most `timeout_ms`; raises a retriable `KafkaError` when
        the brokers cannot be reached."""
        ...

    def assignment(self) -> set[Partition]:
        """The partitions the group gave this consumer."""
        ...

    def pause(self, partitions: Iterable[Partition]) -> None:
        """Fetch nothing more from `partitions` until they are resumed."""
        ...

    def resume(self, partitions: Iterable[Partition]) -> None:
        """Fetch from `partitions` again (resuming one that is not paused does nothing)."""
        ...

    def seek(self, partition: Partition, offset: int) -> None:
        """Read `partition` from `offset` on."""
        ...

    def lag(self) -> dict[Partition, int]:
        """Records behind the high watermark per assigned partition, as of the last fetch (no broker round
        trip); partitions not fetched yet are left out."""
        ...

    def position(self, partition: Partition) -> int | None:
        """The next offset this consumer reads from an assigned `partition`; None while it is not known
        (no broker round trip)."""
        ...

    def partitions(self, topic: str) -> list[int]:
        """The partitions of `topic` as the client's metadata has them (none for a topic it does not know)."""
        ...

    def beginning_offsets(self, partitions: list[Partition]) -> dict[Partition, int]:
        """The brokers' first offsets of `partitions` (a bounded round trip; raises `KafkaError`)."""
        ...

    def end_offsets(self, partitions: list[Partition]) -> dict[Partition, int]:
        """The brokers' end offsets of `partitions` (a bounded round trip; raises `KafkaError`)."""
        ...

    def committed(self, partition: Partition) -> int | None:
        """The group's committed offset of `partition` on the broker (a bounded round trip)."""
        ...

    def commit(self, offsets: Mapping[Partition, int], *, wait: bool) -> None:
        """Commit next offsets; with `wait`, raise `KafkaError` unless the broker took them, without it
        (inside a rebalance) send them and only log a failure."""
        ...

    def open_connections(self) -> int | None:
        """Connections to brokers open now (no round trip); None when the client does not tell."""
        ...

    def close(self) -> None:
        """Leave the group without committing anything more."""
        ...


def open_consumer(settings: KafkaSettings, group_id: str) -> GroupConsumer:
    """The consumer `settings.client` names, once a broker has answered (else `KafkaUnreachable`)."""
    if settings.client == "confluent":
        from detector.kafka.confluent import ConfluentConsumer

        return ConfluentConsumer(settings, group_id)
    return KafkaPythonConsumer(settings, group_id)


def names(partitions: Iterable[Partition]) -> list[str]:
    """`topic/partition` for each, sorted: for logs."""
    return sorted(f"{topic}/{partition}" for topic, partition in partitions)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, revoked: RebalanceHook, assigned: RebalanceHook) -> None:
        self._revoked = revoked
        self._assigned = assigned

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        if revoked:
            self._revoked([(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._assigned([(tp.topic, tp.partition) for tp in assigned])


class KafkaPythonConsumer:
    """`GroupConsumer` on kafka-python's `KafkaConsumer` (2.3 or 3.0)."""

    def __init__(self, settings: KafkaSettings, group_id: str) -> None:
        self._consumer = open_client(
            KafkaConsumer,
            settings,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=settings.auto_offset_reset,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=max(settings.session_timeout_ms // 3, 100),
            max_poll_records=settings.max_poll_records,
            fetch_max_bytes=settings.fetch_max_bytes,
            max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
            fetch_min_bytes=settings.fetch_min_bytes,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
        self._listener: _Listener | None = None
        self._topics: list[str] = []

    def subscribe(self, topics: list[str], revoked: RebalanceHook, assigned: RebalanceHook) -> None:
        self._topics, self._listener = topics, _Listener(revoked, assigned)
        self._consumer.subscribe(topics, listener=self._listener)

    def unsubscribe(self) -> None:
        self._consumer.unsubscribe()

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        fetched = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        received_at = time.time()
        return [
            RawRecord(
                message.value,
                message.key,
                Origin("kafka", message.topic, message.partition, message.offset),
                received_at,
            )
            for messages in fetched.values()
            for message in messages
        ]

    def assignment(self) -> set[Partition]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def pause(self, partitions: Iterable[Partition]) -> None:
        self._consumer.pause(*(TopicPartition(*partition) for partition in partitions))

    def resume(self, partitions: Iterable[Partition]) -> None:
        self._consumer.resume(*(TopicPartition(*partition) for partition in partitions))

    def seek(self, partition: Partition, offset: int) -> None:
        self._consumer.seek(TopicPartition(*partition), offset)

    def lag(self) -> dict[Partition, int]:
        lag: dict[Partition, int] = {}
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            position = self.position((tp.topic, tp.partition))  # a fetched partition has its position
            if position is not None:
                lag[(tp.topic, tp.partition)] = max(highwater - position, 0)
        return lag

    def position(self, partition: Partition) -> int | None:
        # Timeout 0: a position still to be looked up is not waited for.
        position = self._consumer.position(TopicPartition(*partition), timeout_ms=0)
        return None if position is None else int(position)

    def partitions(self, topic: str) -> list[int]:
        return sorted(self._consumer.partitions_for_topic(topic) or ())

    def beginning_offsets(self, partitions: list[Partition]) -> dict[Partition, int]:
        return self._offsets(self._consumer.beginning_offsets, partitions)

    def end_offsets(self, partitions: list[Partition]) -> dict[Partition, int]:
        return self._offsets(self._consumer.end_offsets, partitions)

    @staticmethod
    def _offsets(
        lookup: Callable[..., dict[TopicPartition, int | None]], partitions: list[Partition]
    ) -> dict[Partition, int]:
        wanted = [TopicPartition(*partition) for partition in partitions]
        if BOOTSTRAP_TIMEOUT_OPTION == "bootstrap_timeout_ms":  # kafka-python 3 takes a bound
            found = lookup(wanted, timeout_ms=OFFSETS_TIMEOUT_MS)
        else:
            found = lookup(wanted)
        return {(tp.topic, tp.partition): offset for tp, offset in found.items() if offset is not None}

    def committed(self, partition: Partition) -> int | None:
        offset = self._consumer.committed(TopicPartition(*partition), timeout_ms=OFFSETS_TIMEOUT_MS)
        return None if offset is None else int(offset)

    def commit(self, offsets: Mapping[Partition, int], *, wait: bool) -> None:
        committed = {
            TopicPartition(*partition): OffsetAndMetadata(offset, "", -1)
            for partition, offset in offsets.items()
        }
        if wait:
            self._consumer.commit(committed)
        else:
            self._consumer.commit_async(committed, callback=_log_failed_commit)

    def open_connections(self) -> int | None:
        return open_connections(self._consumer)

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def _log_failed_commit(offsets: Mapping[TopicPartition, OffsetAndMetadata], response: Any) -> None:
    if isinstance(response, Exception):
        log.warning(
            "offsets of %s not committed: %s", names((tp.topic, tp.partition) for tp in offsets), response
        )
