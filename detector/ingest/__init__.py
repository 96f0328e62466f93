"""Ingest: raw records from a source (Kafka, JSON Lines), decoded into `Query` rows or rejected as dead
letters."""

from detector.ingest.decode import RecordDecoder

__all__ = ["RecordDecoder"]
