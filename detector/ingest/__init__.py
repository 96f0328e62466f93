"""Ingest: raw records from a source, decoded into `Query` rows or rejected as dead letters."""

from detector.ingest.decode import RecordDecoder
from detector.ingest.records import DeadLetter, DeadLetterReason, InvalidRecord, Origin, RawRecord

__all__ = ["DeadLetter", "DeadLetterReason", "InvalidRecord", "Origin", "RawRecord", "RecordDecoder"]
