"""The Kafka source (a consumer group with manual commits) and the dead-letter topic."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from detector.domain import DeadLetter, Origin, RawRecord
from detector.kafka import KafkaPublisher, open_client
from detector.settings import KafkaSettings

log = logging.getLogger(__name__)

Positions = dict[tuple[str, int], int]  # (topic, partition) -> next offset to read
StoredPositions = Callable[[], Positions]


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in partitions)


RebalanceHook = Callable[[list[TopicPartition]], None]


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands rebalances to the source. kafka-python 3 calls it on its network thread (while `poll` waits),
    where a blocking broker call is refused: nothing the hooks do may block on the broker."""

    def __init__(self, revoked: RebalanceHook, assigned: RebalanceHook) -> None:
        self._revoked = revoked
        self._assigned = assigned

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        if revoked:
            log.info("partitions revoked: %s", _names(revoked))
            self._revoked(list(revoked))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info("partitions assigned: %s", _names(assigned))
        self._assigned(list(assigned))


class KafkaSource:
    """Reads raw records from `topics` in a consumer group; offsets move only through `commit`.

    `on_revoke` runs inside `poll` before partitions are taken away: the pipeline makes its pending results
    durable there (with their checkpoints) and commits, so the next owner of a partition starts after what
    was stored. It must not raise. `stored_positions` reads those checkpoints: a partition assigned to this
    consumer resumes at its stored position when there is one, since an offset commit made during a
    rebalance is sent without waiting for the broker and may not have landed; it must not raise either
    (an empty answer leaves the broker's committed offsets, which are never ahead of the stored ones).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        on_revoke: Callable[[], None],
        topics: list[str] | None = None,
        group_id: str | None = None,
        stored_positions: StoredPositions | None = None,
    ) -> None:
        self.topics = topics or settings.topics
        self.group_id = group_id or settings.group_id
        self._max_records = settings.max_poll_records
        self._timeout_ms = settings.poll_timeout_ms
        self._on_revoke = on_revoke
        self._stored_positions = stored_positions
        self._in_rebalance = False
        self._consumer = open_client(
            KafkaConsumer,
            settings,
            group_id=self.group_id,
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
        self._consumer.subscribe(self.topics, listener=_RebalanceListener(self._revoked, self._assigned))

    @property
    def exhausted(self) -> bool:
        """Never: a topic may always receive more records."""
        return False

    def poll(self) -> list[RawRecord]:
        """Up to `max_poll_records` records, waiting at most the poll timeout; [] when there are none."""
        fetched = self._consumer.poll(timeout_ms=self._timeout_ms, max_records=self._max_records)
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

    @property
    def assigned(self) -> bool:
        """True once the group has given this consumer at least one partition."""
        return bool(self._consumer.assignment())

    def hold(self, held: bool) -> None:
        """Stop (True) or resume (False) fetching from the assigned partitions (back-pressure).

        `poll` must still be called meanwhile: it keeps the consumer in its group and returns nothing.
        """
        if held:
            self._consumer.pause(*self._consumer.assignment())
        else:
            self._consumer.resume(*self._consumer.paused())

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind the high watermark per assigned partition, as of the consumer's last fetch.

        No broker round trip: the high watermark comes with every fetch response. Partitions not fetched
        yet are left out. (Some brokers, tansu among them, report a high watermark below the true end.)
        """
        lag: dict[tuple[str, int], int] = {}
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            # A fetched partition has its position; timeout 0 keeps a lookup that is still due from blocking.
            position = self._consumer.position(tp, timeout_ms=0)
            if position is not None:
                lag[(tp.topic, tp.partition)] = max(highwater - position, 0)
        return lag

    def commit(self, positions: Mapping[tuple[str, int], int]) -> None:
        """Commit `positions` (next offsets); a no-op when empty.

        Synchronous, raising `KafkaError` when the broker does not take them; during a rebalance (from
        `on_revoke`) the commit is sent without waiting, and a failure is only logged.
        """
        if not positions:
            return
        offsets = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
            for (topic, partition), offset in positions.items()
        }
        if self._in_rebalance:
            self._consumer.commit_async(offsets, callback=_log_failed_commit)
        else:
            self._consumer.commit(offsets)

    def _revoked(self, partitions: list[TopicPartition]) -> None:
        self._in_rebalance = True
        try:
            self._on_revoke()
        finally:
            self._in_rebalance = False

    def _assigned(self, partitions: list[TopicPartition]) -> None:
        stored = self._stored_positions() if self._stored_positions is not None else {}
        for tp in partitions:
            position = stored.get((tp.topic, tp.partition))
            if position is not None:
                self._consumer.seek(tp, position)

    def close(self) -> None:
        """Leave the group (without committing anything more)."""
        self._consumer.close(autocommit=False)


def _log_failed_commit(offsets: Mapping[TopicPartition, OffsetAndMetadata], response: Any) -> None:
    if isinstance(response, Exception):
        log.warning("offsets of %s not committed: %s", _names(offsets), response)


class DeadLetterTopic:
    """Publishes dead letters to `topic` through `publisher` (the pipeline's `DeadLetterPublisher`)."""

    def __init__(self, publisher: KafkaPublisher, topic: str) -> None:
        self._publisher = publisher
        self._topic = topic

    def publish(self, letters: Sequence[DeadLetter]) -> None:
        """Send `letters` and wait until the broker has them all; raises `KafkaError` otherwise."""
        for letter in letters:
            self._publisher.send_dead_letter(self._topic, letter)
        self._publisher.flush()
