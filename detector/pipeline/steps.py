"""The steps a polled batch goes through, in order: Decode, Deduplicate, Restore, Sessionize, Detect.

Every step has one signature, `process(batch) -> batch`: it reads what the steps before it put in the
`Batch` and adds its own results. Storage is read by Deduplicate and Restore only, and they change nothing a
second run would change again; Sessionize and Detect, which count and learn, read nothing. So a database
failure (`StorageUnavailable`) can only come before any count was taken: the pipeline holds the batch and
offers it again later, and its queries are counted once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from detector.domain import (
    DeadLetter,
    DeadLetterReason,
    Detection,
    InvalidRecord,
    Query,
    RawRecord,
    display_name,
)
from detector.features.client import ClientFeatures, ClientKey, FeatureTracker, is_signal
from detector.ingest.decode import RecordDecoder
from detector.scoring.coordination import CoordinationTracker, PoolKey, network_of
from detector.scoring.detector import Detector, Moment, RatioObserver
from detector.scoring.scorer import ANOMALY_MIN_QUERIES
from detector.sessions import SessionTracker
from detector.storage import SeenEvent, Store

log = logging.getLogger(__name__)

Decoded = tuple[RawRecord, list[Query]]  # a decodable record and its queries
# A client that signalled (`is_signal`) is judged once this many queries came since its last judgement: an
# attack's signals come every few queries, and a client whose every query is one (the owner's job re-scoring
# training records) costs a judgement every eighth query, not every query.
SIGNAL_SPACING = 8


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
    detections: list[Detection] = field(default_factory=list)  # Detect: rules that fired or hold, in order


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


class RestoreStep:
    """Takes back from storage what memory no longer holds of the batch's clients: their latest sessions, then
    their features (`DetectStep.restore`). Taking back is all it changes, and a client taken back is no longer
    missing: a batch retried after a failed read reads only what it has not got yet."""

    def __init__(self, sessions: SessionTracker, detect: DetectStep, store: Store) -> None:
        self._sessions = sessions
        self._detect = detect
        self._store = store

    def process(self, batch: Batch) -> Batch:
        if not batch.fresh:
            return batch
        clients = {(queries[0].model, queries[0].client_id) for _, queries in batch.fresh}
        missing = self._sessions.missing(clients)
        if missing:
            for session in self._store.latest_sessions(missing):
                self._sessions.restore(session)
        self._detect.restore(batch.fresh, clients)
        return batch


class SessionizeStep:
    """Counts queries into their (model, client) sessions (restored by the Restore step before it)."""

    def __init__(self, tracker: SessionTracker) -> None:
        self._tracker = tracker

    def process(self, batch: Batch) -> Batch:
        for _, queries in batch.fresh:
            for query in queries:
                self._tracker.update(query)
            batch.queries += len(queries)
        return batch


class StoredFeatures(Protocol):
    """Where the features stored at each commit are read back from (`detector.storage.Store`)."""

    def client_states(self, keys: Collection[ClientKey]) -> Mapping[ClientKey, bytes]: ...

    def model_scales(self) -> Mapping[str, bytes]: ...

    def pools(self, keys: Collection[PoolKey]) -> Mapping[PoolKey, bytes]: ...


class DetectStep:
    """Streaming features for every query and, on the query that makes a client due (`due`), the rules and
    the pooling of training-set hits across clients on that client; at the commit, the anomaly model on the
    moments judged since the last one, in one micro-batch (`judge`).

    Every detection is taken on a query, and a client is due on a query whatever batch it came in: the
    detections, and their `detected_at`, are the same however the stream was batched (live, a backlog, a
    replay). `observe_ratio`, when set (the pipeline's metrics), is handed the verdicts of every client
    judged. With `stored` set (the store), a client whose features are not in memory goes on from its stored
    state, on the input scales stored with it (`restore`, run by the Restore step): a restart, a partition
    move or an eviction loses nothing committed.
    """

    def __init__(
        self,
        tracker: FeatureTracker,
        detector: Detector,
        coordination: CoordinationTracker,
        revisit_seconds: float = 450.0,
    ) -> None:
        self.tracker = tracker
        self.detector = detector
        self.coordination = coordination
        self.revisit_seconds = revisit_seconds
        self.observe_ratio: RatioObserver | None = None
        # Where features are read back from (the store); None keeps them in memory only.
        self.stored: StoredFeatures | None = None
        self._scales_read = False
        self._moments: list[Moment] = []  # judged by the rules since the last commit, for the forest

    def due(self, client: ClientFeatures, at: float) -> bool:
        """True when `client`, just updated with its query at event time `at`, is to be judged now.

        Every query while a client is young; then after each ~3% more of its traffic (a busy client's
        snapshots would dominate the cost); once `SIGNAL_SPACING` queries or more came since the last
        judgement when one of them `signalled` (`is_signal`: a burst, a flip, a round, a training record),
        so that a key with a long history is caught within a few queries of its attack, not 3% of its
        history later, even when the attack's last signal came just after a judgement; and at least every
        `revisit_seconds` of event time, so that an open alert of a slow client is kept alive (or let go)
        by its own queries rather than by gaps between judgements.
        """
        since = client.queries - client.evaluated_at
        return (
            since >= max(1, client.queries // 32)
            or (client.signalled and since >= SIGNAL_SPACING)
            or at - client.evaluated_time >= self.revisit_seconds
        )

    def restore(self, fresh: list[Decoded], clients: set[ClientKey]) -> None:
        """Take back from `stored` (if set) the features of `clients` (those of `fresh`) not in memory, the
        pools of their networks and, once, the input scales. Reads storage (the Restore step calls it,
        before any query is counted); a failed read leaves the clients missing, read again on the retry."""
        stored, tracker = self.stored, self.tracker
        if stored is None:
            return
        if not self._scales_read:
            tracker.embedder.adopt(stored.model_scales())
            self._scales_read = True
        missing = tracker.missing(clients)
        if not missing:
            return
        # Both reads before either is taken in.
        states = stored.client_states(missing)
        pools = self._stored_pools(stored, fresh, missing)
        for model, client_id in tracker.restore(states):
            log.warning(
                "the stored features of client %s of model %s are unreadable: started afresh",
                display_name(client_id),
                display_name(model),
            )
        self.coordination.load(pools)

    def process(self, batch: Batch) -> Batch:
        if not batch.fresh:
            return batch
        tracker = self.tracker
        for observation in tracker.observe([query for _, queries in batch.fresh for query in queries]):
            key, client, match = tracker.update_one(observation)
            at = observation.query.timestamp
            client.signalled = client.signalled or is_signal(observation, match)
            if not self.due(client, at):
                continue
            client.evaluated_at, client.evaluated_time, client.signalled = client.queries, at, False
            moment = Moment.of(key, client, at)
            batch.detections += self.coordination.observe(key, client, moment.values, at)
            batch.detections += self.detector.evaluate(moment, observe=self.observe_ratio)
            if self.detector.judges_anomalies and moment.queries >= ANOMALY_MIN_QUERIES:
                self._moments.append(moment)
        return batch

    def forget(self) -> None:
        """Forget every client's features, the input scales learned since they were stored and the pools of
        training-set hits: what is stored is read back as the clients come again. Nothing is forgotten
        without a store to read from."""
        if self.stored is not None:
            self.tracker.clear()
            self.coordination.clear()
            self._scales_read = False

    def release_idle(self, horizon: float) -> int:
        """Let go of the features of clients idle since before `horizon` (event time) whose state is stored;
        they come back from storage with their next query. Nothing is let go without a store to read from.
        Returns how many clients were let go."""
        return self.tracker.release_idle(horizon) if self.stored is not None else 0

    def _stored_pools(
        self, stored: StoredFeatures, fresh: list[Decoded], clients: set[ClientKey]
    ) -> Mapping[PoolKey, bytes]:
        """The `stored` pools of the networks of `clients` (not in memory before this batch) that the
        coordination tracker holds nothing of, to load before their queries are observed."""
        networks: set[PoolKey] = set()
        for _, queries in fresh:
            query = queries[0]
            if (query.model, query.client_id) in clients:
                network = network_of(query.client_ip)
                if network is not None:
                    networks.add((query.model, network))
        unknown = self.coordination.unknown(networks)
        return stored.pools(unknown) if unknown else {}

    def judge(self, watermark: float | None) -> list[Detection]:
        """The anomaly model's detections on the moments judged since the last call, in order (one
        micro-batch); lets the cross-client pools forget what is a window older than `watermark`."""
        moments, self._moments = self._moments, []
        if watermark is not None:
            self.coordination.forget(watermark)
        return self.detector.evaluate_anomalies(moments, observe=self.observe_ratio)
