"""The steps a polled batch goes through, in order: Decode, Deduplicate, Sessionize, Detect.

Every step has one signature, `process(batch) -> batch`: it reads what the steps before it put in the
`Batch` and adds its own results. A step that reads storage does so before it changes any state of its own,
so that a database failure (`StorageUnavailable`) leaves the batch unprocessed and the steps as they were:
the pipeline holds the batch and offers it again later.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from detector.domain import DeadLetter, DeadLetterReason, Detection, InvalidRecord, Query, RawRecord
from detector.features.client import ClientKey, FeatureTracker
from detector.ingest.decode import RecordDecoder
from detector.scoring.coordination import CoordinationTracker
from detector.scoring.detector import Detector, RatioObserver
from detector.sessions import SessionTracker
from detector.storage import SeenEvent, Store

Decoded = tuple[RawRecord, list[Query]]  # a decodable record and its queries


@dataclass
class Batch:
    """One polled batch on its way through the steps.

    The pipeline sets `records` and `already_seen` (events processed since the last commit, not yet stored);
    each step fills in its part.
    """

    records: list[RawRecord]
    already_seen: Mapping[str, SeenEvent] = field(default_factory=dict)
    decoded: list[Decoded] = field(default_factory=list)  # Decode: the decodable records
    dead_letters: list[DeadLetter] = field(default_factory=list)  # Decode, Deduplicate: the others
    fresh: list[Decoded] = field(default_factory=list)  # Deduplicate: the events not processed before
    seen: list[SeenEvent] = field(default_factory=list)  # Deduplicate: to remember as processed
    duplicates: int = 0  # Deduplicate: events dropped as re-deliveries
    queries: int = 0  # Sessionize: queries counted
    detections: list[Detection] = field(default_factory=list)  # Detect: rules that fired, in order
    touched: set[ClientKey] = field(default_factory=set)  # Detect: clients whose features changed


class Step(Protocol):
    """A step of the chain."""

    def process(self, batch: Batch) -> Batch:
        """`batch` with this step's results added."""
        ...


def record_digest(value: bytes) -> bytes:
    """The digest kept per processed event: the same record re-delivered has the same one."""
    return hashlib.blake2b(value, digest_size=16).digest()


class DecodeStep:
    """Raw records to queries; a record that cannot be decoded becomes a dead letter and the batch goes on."""

    def __init__(self, decoder: RecordDecoder, keep_raw_bytes: int) -> None:
        self._decoder = decoder
        self._keep_raw_bytes = keep_raw_bytes

    def process(self, batch: Batch) -> Batch:
        for record in batch.records:
            try:
                batch.decoded.append((record, self._decoder.decode(record)))
            except InvalidRecord as error:
                batch.dead_letters.append(DeadLetter.from_record(record, error, self._keep_raw_bytes))
        return batch


class DeduplicateStep:
    """Drops events already processed: earlier in this commit (`already_seen`), or durably before (by
    event_id). Another record reusing a processed event id (different bytes) is a dead letter, not a
    duplicate. Reads storage; changes nothing."""

    def __init__(self, store: Store, keep_raw_bytes: int) -> None:
        self._store = store
        self._keep_raw_bytes = keep_raw_bytes

    def process(self, batch: Batch) -> Batch:
        earlier = batch.already_seen
        stored = self._store.seen_digests(
            {queries[0].event_id for _, queries in batch.decoded} - earlier.keys()
        )
        now_seen: dict[str, SeenEvent] = {}
        for record, queries in batch.decoded:
            event_id = queries[0].event_id
            digest = record_digest(record.value)
            known: bytes | None
            if event_id in now_seen:
                known = now_seen[event_id].digest
            elif event_id in earlier:
                known = earlier[event_id].digest
            elif event_id in stored:
                known = stored[event_id]
            else:
                now_seen[event_id] = SeenEvent(event_id, queries[0].timestamp, digest)
                batch.fresh.append((record, queries))
                continue
            # A digest-less ledger entry (stored before digests were kept) can only be taken as a duplicate.
            if known is not None and known != digest:
                error = InvalidRecord(
                    DeadLetterReason.CONFLICTING_DUPLICATE,
                    "event_id was already processed with a record of different content",
                )
                batch.dead_letters.append(DeadLetter.from_record(record, error, self._keep_raw_bytes))
            else:
                batch.duplicates += 1
        batch.seen = list(now_seen.values())
        return batch


class SessionizeStep:
    """Counts queries into their (model, client) sessions, first restoring sessions held only in storage."""

    def __init__(self, tracker: SessionTracker, store: Store) -> None:
        self._tracker = tracker
        self._store = store

    def process(self, batch: Batch) -> Batch:
        # Storage first: restoring is the only read, and it changes nothing a retry would repeat.
        missing = self._tracker.missing(
            {(queries[0].model, queries[0].client_id) for _, queries in batch.fresh}
        )
        if missing:
            for session in self._store.latest_sessions(missing):
                self._tracker.restore(session)
        for _, queries in batch.fresh:
            for query in queries:
                self._tracker.update(query)
            batch.queries += len(queries)
        return batch


class DetectStep:
    """Streaming features for every query, then the rules on each client touched; at the commit, the
    anomaly model on the clients touched since the last one and the pooling of training-set hits across
    clients (`judge`).

    `observe_ratio`, when set (the pipeline's metrics), is handed the verdicts of every client judged.
    """

    def __init__(
        self,
        tracker: FeatureTracker,
        detector: Detector,
        coordination: CoordinationTracker,
        allowed: frozenset[str] = frozenset(),
    ) -> None:
        self.tracker = tracker
        self.detector = detector
        self.coordination = coordination
        # Allow-listed clients are not pooled: their training-set hits are the operators' known business.
        self._allowed = allowed
        self.observe_ratio: RatioObserver | None = None

    def process(self, batch: Batch) -> Batch:
        if not batch.fresh:
            return batch
        touched = self.tracker.update([query for _, queries in batch.fresh for query in queries])
        batch.touched |= touched
        for key in touched:
            client = self.tracker.get(key)
            if client is not None and client.queries - client.evaluated_at >= max(1, client.queries // 32):
                # A busy client is re-judged after each ~3% more of its traffic rather than every batch:
                # detection comes at most that much later, and snapshots stop dominating the cost.
                client.evaluated_at = client.queries
                values = client.snapshot()
                self.coordination.observe(key, client, values)
                batch.detections += self.detector.evaluate(key, client, values, observe=self.observe_ratio)
        return batch

    def judge(self, touched: set[ClientKey], watermark: float | None) -> list[Detection]:
        """The anomaly model's detections on the `touched` clients (one micro-batch), and the pooled
        training-set hits across clients (coordination) up to event time `watermark`."""
        clients = {key: client for key in touched if (client := self.tracker.get(key)) is not None}
        horizon = watermark if watermark is not None else float("-inf")
        return [
            *self.detector.evaluate_anomalies(clients, observe=self.observe_ratio),
            *self.coordination.detections(horizon, set(self._allowed)),
        ]
