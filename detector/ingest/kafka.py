"""The Kafka source (a consumer group with manual commits) and the dead-letter topic."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from detector.domain import DeadLetter, Origin, RawRecord
from detector.kafka import BOOTSTRAP_TIMEOUT_OPTION, KafkaPublisher, open_client, open_connections
from detector.metrics import Metrics
from detector.settings import KafkaSettings

log = logging.getLogger(__name__)

# How often `poll` looks at the consumer's connections to the brokers (no broker round trip).
CONNECTION_CHECK_SECONDS = 1.0
# Bounds the end-offset lookup that checks stored positions (kafka-python 3; 2.x uses its request timeout).
END_OFFSETS_TIMEOUT_MS = 10_000

Positions = dict[tuple[str, int], int]  # (topic, partition) -> next offset to read
# Claims partitions assigned for this member (fencing out their previous owner) and returns their stored
# positions; None when the claim could not be made now (the database is unavailable): asked again later.
ClaimPartitions = Callable[[list[tuple[str, int]]], Positions | None]


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
    was stored. It must not raise. `claim` runs when partitions are assigned, before anything is fetched
    from them: it takes their leases (so that a previous owner that has not noticed the rebalance can no
    longer commit over this one) and reads their stored checkpoints. A partition resumes at its stored
    position when there is one, since an offset commit made during a rebalance is sent without waiting for
    the broker and may not have landed; otherwise at the broker's committed offset, which is never ahead of
    the stored one. Until a claim succeeds (`claim` returns None while the database is unavailable) the
    partitions stay paused, and the claim is made again at every poll. `claim` must not raise. Without
    `claim`, partitions resume at the broker's committed offsets.

    A stored position beyond the broker's end offset means the broker lost records (a broker that kept its
    log in memory and restarted, a topic deleted and created again) or reports a short end: the partition
    then resumes where the broker says (its committed offset, or `auto_offset_reset`), which at worst reads
    again what event-id de-duplication drops, instead of waiting past the end of the log for offsets that the
    new records reach only later. It is logged and counted (`metrics`). So is the loss of the brokers, and
    their return (`mia_detector_broker_connected`); a poll that cannot reach them is retried after the poll
    timeout instead of ending the daemon.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        on_revoke: Callable[[], None],
        topics: list[str] | None = None,
        group_id: str | None = None,
        claim: ClaimPartitions | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.topics = topics or settings.topics
        self.group_id = group_id or settings.group_id
        self._servers = settings.bootstrap_servers
        self._max_records = settings.max_poll_records
        self._timeout_ms = settings.poll_timeout_ms
        self._on_revoke = on_revoke
        self._claim = claim
        self._metrics = metrics
        self._in_rebalance = False
        self._held = False
        # Assigned partitions not claimed yet (the database did not answer), paused until they are.
        self._unclaimed: list[TopicPartition] = []
        # Assigned partitions with a stored position, paused until it is checked against the end offsets.
        self._unchecked: dict[TopicPartition, int] = {}
        self._connected = True
        self._healthy_checks = 0  # consecutive connection checks that found the brokers reachable
        self._poll_error: KafkaError | None = None  # since the last connection check
        self._disconnected_at = 0.0
        self._connection_checked = time.time()
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
        self._listener = _RebalanceListener(self._revoked, self._assigned)
        self._consumer.subscribe(self.topics, listener=self._listener)
        if metrics is not None:
            metrics.broker_connected.set(1)  # the client bootstrapped: it reached a broker

    @property
    def exhausted(self) -> bool:
        """Never: a topic may always receive more records."""
        return False

    def poll(self) -> list[RawRecord]:
        """Up to `max_poll_records` records, waiting at most the poll timeout; [] when there are none."""
        if self._unclaimed:
            self._claim_assigned()
        if self._unchecked:
            self._resume_at_stored_positions()
        try:
            fetched = self._consumer.poll(timeout_ms=self._timeout_ms, max_records=self._max_records)
        except KafkaError as error:
            if not error.retriable:
                raise
            # kafka-python 3 raises a connection lost while it looks up the group coordinator out of `poll`;
            # the client reconnects at the next poll, which must not come at once (no busy loop).
            log.debug("polling Kafka failed: %s", error)
            self._poll_error = error
            time.sleep(self._timeout_ms / 1000)
            fetched = {}
        received_at = time.time()
        if received_at - self._connection_checked >= CONNECTION_CHECK_SECONDS:
            self._connection_checked = received_at
            self._check_connection()
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
        self._held = held
        if held:
            self._consumer.pause(*self._consumer.assignment())
        else:
            # Partitions not claimed, or whose stored position is not checked yet, stay paused.
            waiting = self._unchecked.keys() | set(self._unclaimed)
            self._consumer.resume(*(set(self._consumer.paused()) - waiting))

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

    def rejoin(self) -> None:
        """Give up every partition and join the group again (the pipeline was fenced: another member claimed
        one of its partitions, so this one missed a rebalance). Whatever was read and not stored is read
        again by the partitions' owners, from the stored positions."""
        log.warning(
            "leaving group %s to join it again: partitions of this member were claimed", self.group_id
        )
        self._consumer.unsubscribe()
        self._unclaimed, self._unchecked = [], {}
        self._consumer.subscribe(self.topics, listener=self._listener)

    def _assigned(self, partitions: list[TopicPartition]) -> None:
        self._unclaimed, self._unchecked = list(partitions), {}
        # Nothing is fetched before the claim: it is made here, on the client's network thread under
        # kafka-python 3 (a database call, no broker round trip), and again at each poll until it succeeds.
        self._consumer.pause(*partitions)
        self._claim_assigned()

    def _claim_assigned(self) -> None:
        """Claim the assigned partitions not claimed yet; pause those with a stored position until it is
        checked (a broker round trip, refused on the network thread: the next `poll` does it)."""
        unclaimed = self._unclaimed
        stored = self._claim([(tp.topic, tp.partition) for tp in unclaimed]) if self._claim else {}
        if stored is None:
            return
        self._unclaimed = []
        self._unchecked |= {
            tp: position for tp in unclaimed if (position := stored.get((tp.topic, tp.partition))) is not None
        }
        if not self._held:
            self._consumer.resume(*(tp for tp in unclaimed if tp not in self._unchecked))

    def _resume_at_stored_positions(self) -> None:
        """Seek each unchecked partition to its stored position unless that lies beyond the broker's end
        offset (see the class docstring), then let it be fetched. A failed lookup is retried at the next
        poll."""
        assignment = self._consumer.assignment()
        unchecked = {tp: position for tp, position in self._unchecked.items() if tp in assignment}
        if not unchecked:
            self._unchecked = {}
            return
        try:
            beyond = self._beyond_log_end(unchecked)
        except KafkaError as error:
            log.warning(
                "end offsets of %s unknown (%s): checked again at the next poll", _names(unchecked), error
            )
            return
        for tp, position in unchecked.items():
            if tp not in beyond:
                self._consumer.seek(tp, position)
                continue
            log.warning(
                "stored position %d of %s/%d is beyond the broker's end offset %d: the broker lost records; "
                "resuming where the broker says (committed offset, or auto_offset_reset), records read "
                "again are de-duplicated",
                position,
                tp.topic,
                tp.partition,
                beyond[tp],
            )
            if self._metrics is not None:
                self._metrics.positions_beyond_log_end.inc()
        self._unchecked = {}
        if not self._held:
            self._consumer.resume(*unchecked)

    def _beyond_log_end(self, stored: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The partitions whose stored position lies beyond the broker's end offset, with that end offset;
        raises `KafkaError` when the broker does not answer."""
        if BOOTSTRAP_TIMEOUT_OPTION == "bootstrap_timeout_ms":  # kafka-python 3 takes a bound
            ends = self._consumer.end_offsets(list(stored), timeout_ms=END_OFFSETS_TIMEOUT_MS)
        else:
            ends = self._consumer.end_offsets(list(stored))
        beyond = {}
        for tp, position in stored.items():
            end = ends.get(tp)
            # Some brokers (tansu) report an end below the true one; a broker that still holds the offset
            # this group committed there has not lost the log.
            if (
                end is not None
                and position > end
                and self._consumer.committed(tp, timeout_ms=END_OFFSETS_TIMEOUT_MS) != position
            ):
                beyond[tp] = end
        return beyond

    def _check_connection(self) -> None:
        """Log and export the loss of the brokers (no connection left, or a poll that failed to reach them)
        and their return (connected, without a failed poll, on two checks in a row: a connection that the
        network accepts and then resets does not count)."""
        count = open_connections(self._consumer)
        if count is None:
            count = 1  # a client that does not tell: judged by its polls alone
        error, self._poll_error = self._poll_error, None
        if count > 0 and error is None:
            self._healthy_checks += 1
            if not self._connected and self._healthy_checks >= 2:
                self._connected = True
                log.info(
                    "connected to the Kafka brokers again after %.1f s: consumption resumed",
                    time.monotonic() - self._disconnected_at,
                )
                if self._metrics is not None:
                    self._metrics.broker_connected.set(1)
            return
        self._healthy_checks = 0
        if not self._connected:
            return
        self._connected = False
        self._disconnected_at = time.monotonic()
        log.warning(
            "lost the Kafka brokers at %s (%s): nothing is consumed until they answer again (the client "
            "reconnects with backoff; what was read is stored meanwhile)",
            self._servers,
            error or "no connection left",
        )
        if self._metrics is not None:
            self._metrics.broker_connected.set(0)
            self._metrics.broker_disconnections.inc()

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
