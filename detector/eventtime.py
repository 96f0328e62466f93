"""The stream's event time (its watermark): how far the stream has got, robust to forged timestamps and to
partitions read at different speeds.

Event time closes idle sessions, resolves quiet alerts and ages out cross-client evidence, so one record
must not be able to move it: a timestamp ahead of the moment its record was received by more than the
allowed clock skew only moves the watermark as far as that receipt time plus the skew. (Records that are
further off still are dead letters; see `IngestSettings`.)

A consumer reads its partitions at speeds that depend on the moment (a backlog is fetched partition by
partition, a live stream interleaved): the stream has got only as far as its slowest partition, so the
watermark is the least of the partitions' newest event times, as in Flink or Kafka Streams. Otherwise an
alert of a client on a lagging partition would be resolved as quiet while its next queries wait unread. The
consumer tells it each partition's lag (`lag`): a partition read to its end holds nothing back until it has
new events, and one with records waiting that has given none yet holds the watermark where it is (its first
events may be the oldest of all). When every partition is read to its end, the watermark is the newest event
time of all.
"""

from __future__ import annotations

from collections.abc import Mapping

# A partition of the source: (topic, partition), or None for a source without partitions (files).
Partition = tuple[str, int] | None


class Watermark:
    """The stream's event time (epoch seconds); `value` is None before the first event. It never goes back.

    `max_skew_seconds` None trusts event times as they are (a dataset read offline has no receipt time).
    """

    def __init__(self, max_skew_seconds: float | None) -> None:
        self._max_skew = max_skew_seconds
        self._value = float("-inf")
        self._newest: dict[Partition, float] = {}  # per partition, its newest plausible event time
        self._caught_up: set[Partition] = set()  # read to their end
        self._waiting: set[Partition] = set()  # records to read, none observed yet

    @property
    def value(self) -> float | None:
        """The watermark, or None when no event was observed yet: the least newest event time of the
        partitions still being read, else the newest of all; where it was while a partition with records to
        read has given none yet (never less than before)."""
        reading = [newest for partition, newest in self._newest.items() if partition not in self._caught_up]
        if self._newest and not self._waiting:
            self._value = max(self._value, min(reading) if reading else max(self._newest.values()))
        return None if self._value == float("-inf") else self._value

    @property
    def front(self) -> float | None:
        """The newest event time of any partition (at least `value`): no partition has got further."""
        value = self.value
        newest = max(self._newest.values(), default=float("-inf"))
        return None if value is None else max(value, newest)

    def of(self, partition: Partition) -> float | None:
        """How far `partition` has got: its newest plausible event time, None if it gave none (since it was
        assigned)."""
        return self._newest.get(partition)

    def observe(self, event_time: float, received_at: float, partition: Partition = None) -> None:
        """Advance with one event stamped `event_time`, received at `received_at` (epoch seconds), read
        from `partition`."""
        if self._max_skew is not None:
            event_time = min(event_time, received_at + self._max_skew)
        if event_time > self._newest.get(partition, float("-inf")):
            self._newest[partition] = event_time
        self._caught_up.discard(partition)
        self._waiting.discard(partition)

    def lag(self, behind: Mapping[tuple[str, int], int]) -> None:
        """Note how many records each partition the consumer knows of has still to be read: those at 0 hold
        the watermark back no more; those with records, none observed yet, hold it where it is."""
        self._caught_up = {partition for partition, records in behind.items() if records == 0}
        self._waiting = {
            partition
            for partition, records in behind.items()
            if records > 0 and partition not in self._newest
        }

    def release(self) -> None:
        """Forget the partitions (they were revoked and may move elsewhere); the value stays where it is."""
        _ = self.value
        self._newest.clear()
        self._caught_up.clear()
        self._waiting.clear()
