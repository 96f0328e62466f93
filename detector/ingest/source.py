"""What the consumer loop needs of a source of raw records: Kafka (`detector.ingest.kafka.KafkaSource`) or
JSON Lines files (`detector.ingest.jsonl.FileSource`)."""

from __future__ import annotations

from typing import Protocol

from detector.domain import RawRecord


class Source(Protocol):
    """A source of raw records read in batches, which can be held (back-pressure) without losing any."""

    @property
    def exhausted(self) -> bool:
        """True once no record will ever come again (the end of a file; never for a topic)."""
        ...

    @property
    def assigned(self) -> bool:
        """True while the source has something to read from (a consumer group gave it partitions)."""
        ...

    def poll(self) -> list[RawRecord]:
        """The next records, waiting a little for them; [] when there are none (or while held)."""
        ...

    def hold(self, held: bool) -> None:
        """Stop (True) or resume (False) delivering records; `poll` must still be called meanwhile."""
        ...

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind the end, per partition, as far as the source knows without asking the broker."""
        ...

    def left_to_read(self) -> dict[tuple[str, int], int] | None:
        """Records not read yet, per partition with any: past this source's position or, for a consumer
        group, past the group's committed offsets on the partitions other members hold. None when that
        cannot be told now (the broker did not answer). May ask the broker: for an occasional check (is
        the stream drained?), not for every poll."""
        ...

    def close(self) -> None:
        """Let go of the source."""
        ...
