"""Kafka source (a consumer group with manual commits) and publisher (dead-letter topic, `produce`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from detector.ingest.records import DeadLetter, Origin, RawRecord
from detector.settings import KafkaSettings

log = logging.getLogger(__name__)

Positions = dict[tuple[str, int], int]  # (topic, partition) -> next offset to read
StoredPositions = Callable[[], Positions]


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by consumers and producers."""
    options: dict[str, Any] = {
        "bootstrap_servers": [server.strip() for server in settings.bootstrap_servers.split(",")],
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            options["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return options


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
        self._consumer = KafkaConsumer(
            **client_options(settings),
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


class KafkaPublisher:
    """A producer for whole JSON records keyed by client id, and for dead letters."""

    def __init__(self, settings: KafkaSettings) -> None:
        # Idempotence stays off: a producer id does not survive a restart of the embedded broker, and
        # consumers de-duplicate by event_id anyway.
        self._producer = KafkaProducer(
            **client_options(settings),
            acks="all",
            enable_idempotence=False,
            retries=10,
            linger_ms=20,
            batch_size=256 * 1024,
            compression_type=None,
        )
        self._pending: list[Any] = []

    def send(self, topic: str, value: bytes, key: bytes | None) -> None:
        """Queue one message; `flush` makes it durable."""
        self._pending.append(self._producer.send(topic, value=value, key=key))

    def send_dead_letter(self, topic: str, letter: DeadLetter) -> None:
        """Queue a dead letter: the raw (truncated) bytes, with reason and origin as headers."""
        future = self._producer.send(
            topic,
            value=letter.raw,
            headers=[
                ("mia-reason", letter.reason.value.encode()),
                ("mia-detail", letter.detail.encode()[:1000]),
                ("mia-source", letter.origin.describe().encode()),
                ("mia-size", str(letter.raw_size).encode()),
            ],
        )
        self._pending.append(future)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until every queued message is acknowledged; raise the first delivery error, if any."""
        self._producer.flush(timeout=timeout)
        pending, self._pending = self._pending, []
        for future in pending:
            future.get(timeout=timeout)

    def close(self) -> None:
        """Flush and close."""
        self._producer.close()
