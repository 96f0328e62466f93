"""What a source hands to the pipeline (raw records and where they came from) and what it rejects."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(slots=True, frozen=True)
class Origin:
    """Where one raw record came from: a Kafka topic/partition/offset, or a file (or stdin) and line."""

    kind: str  # "kafka" or "file"
    name: str  # topic, or file path ("-" for stdin)
    partition: int  # Kafka partition; 0 for files
    position: int  # Kafka offset, or 1-based line number

    def describe(self) -> str:
        """A stable, human-readable address (`kafka:topic/2@1234`, `file:events.jsonl:17`)."""
        if self.kind == "kafka":
            return f"kafka:{self.name}/{self.partition}@{self.position}"
        return f"file:{self.name}:{self.position}"


@dataclass(slots=True, frozen=True)
class RawRecord:
    """One undecoded record: the bytes of a Kafka message value or of a JSON Lines line."""

    value: bytes
    key: bytes | None
    origin: Origin
    received_at: float  # epoch seconds at which the source read it
    # Set where `value` holds only the record's first bytes (a line too long for any record to be read
    # whole): the record's full size.
    full_size: int | None = None

    @property
    def size(self) -> int:
        """The record's size in bytes, whether `value` holds all of it or only its first bytes."""
        return len(self.value) if self.full_size is None else self.full_size


class DeadLetterReason(StrEnum):
    """Why a record could not be turned into queries. Closed set: metrics use it as a label."""

    RECORD_TOO_LARGE = "record_too_large"
    INVALID_ENCODING = "invalid_encoding"
    INVALID_JSON = "invalid_json"
    SCHEMA_VIOLATION = "schema_violation"
    UNSUPPORTED_DATATYPE = "unsupported_datatype"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    BATCH_TOO_LARGE = "batch_too_large"
    IMPLAUSIBLE_TIMESTAMP = "implausible_timestamp"
    CONFLICTING_DUPLICATE = "conflicting_duplicate"


class InvalidRecord(Exception):
    """A record that must go to dead letters, with its reason and a one-line detail."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """A rejected record: reason, detail, where it came from, and its first bytes (`raw`, truncated)."""

    reason: DeadLetterReason
    detail: str
    origin: Origin
    raw: bytes
    raw_size: int
    received_at: float

    @classmethod
    def from_record(cls, record: RawRecord, error: InvalidRecord, keep_bytes: int) -> DeadLetter:
        """Build the dead letter of `record`, keeping at most `keep_bytes` of its value."""
        return cls(
            reason=error.reason,
            detail=error.detail[:1000],
            origin=record.origin,
            raw=record.value[:keep_bytes],
            raw_size=record.size,
            received_at=record.received_at,
        )
