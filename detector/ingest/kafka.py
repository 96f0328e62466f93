"""The Kafka source (a consumer group with manual commits) and the dead-letter topic."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from kafka.errors import KafkaError

from detector.domain import DeadLetter, RawRecord
from detector.kafka import KafkaPublisher, open_consumer
from detector.kafka.consumers import Partition, names
from detector.metrics import Metrics
from detector.settings import KafkaSettings

log = logging.getLogger(__name__)

# How often `poll` looks at the consumer's connections to the brokers (no broker round trip).
CONNECTION_CHECK_SECONDS = 1.0

Positions = dict[Partition, int]  # (topic, partition) -> next offset to read
# Claims partitions assigned for this member (fencing out their previous owner) and returns their stored
# positions; None when the claim could not be made now (the database is unavailable): asked again later.
ClaimPartitions = Callable[[list[Partition]], Positions | None]


class KafkaSource:
    """Reads raw records from `topics` in a consumer group; offsets move only through `commit`. The client
    is the one `settings.client` names (`detector.kafka.consumers.open_consumer`).

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
        self._auto_offset_reset = settings.auto_offset_reset
        self._timeout_ms = settings.poll_timeout_ms
        self._on_revoke = on_revoke
        self._claim = claim
        self._metrics = metrics
        self._in_rebalance = False
        self._held = False
        # Assigned partitions not claimed yet (the database did not answer), paused until they are.
        self._unclaimed: list[Partition] = []
        # Assigned partitions with a stored position, paused until it is checked against the end offsets.
        self._unchecked: dict[Partition, int] = {}
        self._connected = True
        self._healthy_checks = 0  # consecutive connection checks that found the brokers reachable
        self._poll_error: KafkaError | None = None  # since the last connection check
        self._disconnected_at = 0.0
        self._connection_checked = time.time()
        self._consumer = open_consumer(settings, self.group_id)
        self._consumer.subscribe(self.topics, self._revoked, self._assigned)
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
            records = self._consumer.poll(self._timeout_ms, self._max_records)
        except KafkaError as error:
            if not error.retriable:
                raise
            # kafka-python 3 raises a connection lost while it looks up the group coordinator out of `poll`;
            # the client reconnects at the next poll, which must not come at once (no busy loop).
            log.debug("polling Kafka failed: %s", error)
            self._poll_error = error
            time.sleep(self._timeout_ms / 1000)
            records = []
        now = time.time()
        if now - self._connection_checked >= CONNECTION_CHECK_SECONDS:
            self._connection_checked = now
            self._check_connection()
        return records

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
            self._consumer.pause(self._consumer.assignment())
        else:
            # Partitions not claimed, or whose stored position is not checked yet, stay paused.
            waiting = self._unchecked.keys() | set(self._unclaimed)
            self._consumer.resume(self._consumer.assignment() - waiting)

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind the high watermark per assigned partition, as of the consumer's last fetch.

        No broker round trip: the high watermark comes with every fetch response. Partitions not fetched
        yet are left out. (Some brokers, tansu among them, report a high watermark below the true end.)
        """
        return self._consumer.lag()

    def left_to_read(self) -> dict[tuple[str, int], int] | None:
        """Records of the topics that no member of the group has read, per partition with any: past this
        member's position on the partitions it reads, past the group's committed offset on the others
        (which another member holds, or which the group has not handed out yet), or past where
        `auto_offset_reset` starts a partition that the group never committed. This member's partitions held
        until the database lets it claim them (or checks their stored positions) are not counted: this member
        is the one to read them, and it cannot now; waiting for them would wait for the database, which the
        run's end meets instead (its last commit fails, in one line). None (logged) when the broker does not
        answer. Some brokers (tansu) report an end offset below the true one: what lies beyond it is not
        counted."""
        try:
            return self._left_to_read()
        except KafkaError as error:
            log.info("records left to the group unknown: %s", error)
            return None

    def _left_to_read(self) -> dict[Partition, int]:
        consumer = self._consumer
        partitions = [(topic, partition) for topic in self.topics for partition in consumer.partitions(topic)]
        ends = consumer.end_offsets(partitions)
        assigned = consumer.assignment()
        held = assigned & (self._unchecked.keys() | set(self._unclaimed))
        read: dict[Partition, int] = {}
        never_committed = []
        for partition in ends.keys() - held:
            position = consumer.position(partition) if partition in assigned else None
            if position is None:
                position = consumer.committed(partition)
            if position is None:
                never_committed.append(partition)
            else:
                read[partition] = position
        if never_committed:
            starts = (
                ends if self._auto_offset_reset == "latest" else consumer.beginning_offsets(never_committed)
            )
            read |= {partition: starts.get(partition, 0) for partition in never_committed}
        return {
            partition: ends[partition] - read[partition]
            for partition in read
            if ends[partition] > read[partition]
        }

    def commit(self, positions: Mapping[tuple[str, int], int]) -> None:
        """Commit `positions` (next offsets); a no-op when empty.

        Synchronous, raising `KafkaError` when the broker does not take them; during a rebalance (from
        `on_revoke`) the commit is sent without waiting, and a failure is only logged.
        """
        if positions:
            self._consumer.commit(positions, wait=not self._in_rebalance)

    def _revoked(self, partitions: list[Partition]) -> None:
        log.info("partitions revoked: %s", names(partitions))
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
        self._consumer.subscribe(self.topics, self._revoked, self._assigned)

    def _assigned(self, partitions: list[Partition]) -> None:
        log.info("partitions assigned: %s", names(partitions))
        self._unclaimed, self._unchecked = list(partitions), {}
        # Nothing is fetched before the claim: it is made here, on the client's network thread under
        # kafka-python 3 (a database call, no broker round trip), and again at each poll until it succeeds.
        self._consumer.pause(partitions)
        self._claim_assigned()

    def _claim_assigned(self) -> None:
        """Claim the assigned partitions not claimed yet; pause those with a stored position until it is
        checked (a broker round trip, refused on the network thread: the next `poll` does it)."""
        unclaimed = self._unclaimed
        stored = self._claim(unclaimed) if self._claim else {}
        if stored is None:
            return
        self._unclaimed = []
        self._unchecked |= {tp: stored[tp] for tp in unclaimed if tp in stored}
        if not self._held:
            self._consumer.resume(tp for tp in unclaimed if tp not in self._unchecked)

    def _resume_at_stored_positions(self) -> None:
        """Seek each unchecked partition to its stored position unless that lies beyond the broker's end
        offset (see the class docstring), then let it be fetched. A failed lookup or seek is retried at the
        next poll, the partition paused meanwhile."""
        assignment = self._consumer.assignment()
        unchecked = {tp: position for tp, position in self._unchecked.items() if tp in assignment}
        if not unchecked:
            self._unchecked = {}
            return
        try:
            beyond = self._beyond_log_end(unchecked)
        except KafkaError as error:
            log.warning(
                "end offsets of %s unknown (%s): checked again at the next poll", names(unchecked), error
            )
            return
        refused: dict[Partition, int] = {}
        for (topic, partition), position in unchecked.items():
            if (topic, partition) not in beyond:
                try:
                    self._consumer.seek((topic, partition), position)
                except KafkaError as error:
                    # librdkafka refuses a seek until the partition's fetch has started ("Erroneous
                    # state"): still paused, it is sought again at the next poll.
                    log.info(
                        "seeking %s/%d to %d refused (%s): again at the next poll",
                        topic,
                        partition,
                        position,
                        error,
                    )
                    refused[(topic, partition)] = position
                continue
            log.warning(
                "stored position %d of %s/%d is beyond the broker's end offset %d: the broker lost records; "
                "resuming where the broker says (committed offset, or auto_offset_reset), records read "
                "again are de-duplicated",
                position,
                topic,
                partition,
                beyond[(topic, partition)],
            )
            if self._metrics is not None:
                self._metrics.positions_beyond_log_end.inc()
        self._unchecked = refused
        if not self._held:
            self._consumer.resume(tp for tp in unchecked if tp not in refused)
        # The group's committed offsets follow: they lag the stored positions where a commit did not land
        # (one sent during a rebalance), and nothing else moves them until records come. Other members
        # (`left_to_read`) and the operators' lag tools read them. Sent without waiting, like a commit from
        # a rebalance; a failure is only logged.
        sought = {
            tp: position for tp, position in unchecked.items() if tp not in beyond and tp not in refused
        }
        if sought:  # never empty: a client reads no offsets as "commit everything consumed"
            self._consumer.commit(sought, wait=False)

    def _beyond_log_end(self, stored: dict[Partition, int]) -> dict[Partition, int]:
        """The partitions whose stored position lies beyond the broker's end offset, with that end offset;
        raises `KafkaError` when the broker does not answer."""
        ends = self._consumer.end_offsets(list(stored))
        beyond = {}
        for partition, position in stored.items():
            end = ends.get(partition)
            # Some brokers (tansu) report an end below the true one; a broker that still holds the offset
            # this group committed there has not lost the log.
            if end is not None and position > end and self._consumer.committed(partition) != position:
                beyond[partition] = end
        return beyond

    def _check_connection(self) -> None:
        """Log and export the loss of the brokers (no connection left, or a poll that failed to reach them)
        and their return (connected, without a failed poll, on two checks in a row: a connection that the
        network accepts and then resets does not count)."""
        count = self._consumer.open_connections()
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
        self._consumer.close()


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
