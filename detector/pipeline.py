"""The processing chain and its commit point: the only module that knows every step.

    raw records ─> Decode ─> Deduplicate ─> Sessionize ─> Detect ─┐
         (bad records ─> dead letters)                            └─> [commit point] Persist ─> Commit offsets

Steps run on each polled batch; their results stay pending until the commit policy says the commit is due.
Detect updates the streaming features of every query's client and applies the rules to the clients it
touched, so attacks are flagged while they run; the anomaly model scores those clients in one micro-batch
at the commit point. Then, in order: dead letters are published (if a dead-letter topic is configured),
everything pending (sessions, alerts, dead letters, seen events, checkpoints) is written to the database in
one transaction, and only then are the source positions committed. A crash at
any point re-delivers at most what was not yet committed, and event-id de-duplication makes re-delivered
events change nothing: at-least-once delivery, exactly-once effect.

Nothing leaves the pending state before the transaction is durable. When the database is unreachable a
batch's reads fail before anything changed, and the batch is held; a failed write leaves everything pending.
Either raises `StorageUnavailable`, and the same call with no new records (`submit([])`) tries again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from detector.alerts.model import Detection
from detector.eventtime import Watermark
from detector.features.client import ClientKey, FeatureTracker
from detector.ingest.decode import RecordDecoder
from detector.ingest.records import DeadLetter, DeadLetterReason, InvalidRecord, RawRecord
from detector.metrics import Metrics
from detector.model import Query
from detector.scoring.coordination import CoordinationTracker
from detector.scoring.detector import Detector, RatioObserver
from detector.sessions import SessionTracker
from detector.storage import Checkpoint, DurableBatch, Store
from detector.storage.alerts import AlertChange, AlertUpdate
from detector.storage.repository import SeenEvent

log = logging.getLogger(__name__)

Positions = dict[tuple[str, int], int]
CommitPositions = Callable[[Mapping[tuple[str, int], int]], None]
PublishDeadLetters = Callable[[list[DeadLetter]], None]
OnAlerts = Callable[[list[tuple[AlertChange, Detection]]], None]
Decoded = tuple[RawRecord, list[Query]]  # a decodable record and its queries

# How often a pipeline with nothing to commit still resolves the alerts that have gone quiet.
RESOLVE_INTERVAL_SECONDS = 10.0


def record_digest(value: bytes) -> bytes:
    """The digest kept per processed event: the same record re-delivered has the same one."""
    return hashlib.blake2b(value, digest_size=16).digest()


@dataclass(frozen=True)
class CommitPolicy:
    """Commit when at least `min_records` records or `min_interval_seconds` seconds have gone by."""

    min_interval_seconds: float
    min_records: int

    def due(self, records: int, seconds: float) -> bool:
        """True when pending work of `records` records, `seconds` old, must be committed now."""
        return records >= self.min_records or (records > 0 and seconds >= self.min_interval_seconds)


@dataclass
class PipelineStats:
    """Running totals since the pipeline started, for summaries at the end of a replay or a run."""

    records: int = 0
    events: int = 0
    queries: int = 0
    duplicates: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    commits: int = 0
    alerts_opened: Counter[str] = field(default_factory=Counter)


@dataclass
class PendingWork:
    """What has been processed since the last commit and must become durable with it."""

    seen_events: dict[str, SeenEvent] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    dead_letters_published: int = 0  # how many of `dead_letters` the dead-letter topic already has
    positions: Positions = field(default_factory=dict)
    detections: dict[str, Detection] = field(default_factory=dict)  # the latest per alert key: stored
    first_detections: dict[str, Detection] = field(default_factory=dict)  # the first: when it fired
    touched: set[ClientKey] = field(default_factory=set)
    sessions_closed: int = 0
    records: int = 0
    since: float = 0.0

    def record(self, detection: Detection) -> None:
        """Keep `detection` as the latest of its alert key, and as the first if it is."""
        self.detections[detection.dedup_key] = detection
        self.first_detections.setdefault(detection.dedup_key, detection)


class DecodeStep:
    """Raw records to queries; a record that cannot be decoded becomes a dead letter and the batch goes on."""

    def __init__(self, decoder: RecordDecoder, keep_raw_bytes: int) -> None:
        self._decoder = decoder
        self._keep_raw_bytes = keep_raw_bytes

    def process(self, records: list[RawRecord]) -> tuple[list[Decoded], list[DeadLetter]]:
        """Each decodable record with its queries, and the dead letters of the others."""
        decoded: list[Decoded] = []
        dead_letters: list[DeadLetter] = []
        for record in records:
            try:
                decoded.append((record, self._decoder.decode(record)))
            except InvalidRecord as error:
                dead_letters.append(DeadLetter.from_record(record, error, self._keep_raw_bytes))
        return decoded, dead_letters


class DeduplicateStep:
    """Drops events already processed: earlier in this commit, or durably before (by event_id). Another
    record reusing a processed event id (different bytes) is a dead letter, not a duplicate."""

    def __init__(self, store: Store, keep_raw_bytes: int) -> None:
        self._store = store
        self._keep_raw_bytes = keep_raw_bytes

    def process(
        self, events: list[Decoded], seen: dict[str, SeenEvent]
    ) -> tuple[list[Decoded], int, list[DeadLetter]]:
        """The events not seen before (then recorded in `seen`), how many duplicates were dropped, and the
        dead letters of conflicting records. Raises `StorageError` before changing anything."""
        stored = self._store.seen_digests({queries[0].event_id for _, queries in events} - seen.keys())
        fresh: list[Decoded] = []
        conflicts: list[DeadLetter] = []
        for record, queries in events:
            event_id = queries[0].event_id
            digest = record_digest(record.value)
            if event_id in seen:
                known: bytes | None = seen[event_id].digest
            elif event_id in stored:
                known = stored[event_id]
            else:
                seen[event_id] = SeenEvent(event_id, queries[0].timestamp, digest)
                fresh.append((record, queries))
                continue
            # A digest-less ledger entry (stored before digests were kept) can only be taken as a duplicate.
            if known is not None and known != digest:
                error = InvalidRecord(
                    DeadLetterReason.CONFLICTING_DUPLICATE,
                    "event_id was already processed with a record of different content",
                )
                conflicts.append(DeadLetter.from_record(record, error, self._keep_raw_bytes))
        return fresh, len(events) - len(fresh) - len(conflicts), conflicts


class SessionizeStep:
    """Counts queries into their (model, client) sessions, first restoring sessions held only in storage."""

    def __init__(self, tracker: SessionTracker, store: Store) -> None:
        self._tracker = tracker
        self._store = store

    def restore(self, events: list[Decoded]) -> None:
        """Take back from storage the sessions of `events`' keys that are not in memory (raises
        `StorageError`; restoring twice changes nothing)."""
        missing = self._tracker.missing({(queries[0].model, queries[0].client_id) for _, queries in events})
        if missing:
            for session in self._store.latest_sessions(missing):
                self._tracker.restore(session)

    def process(self, events: list[Decoded]) -> int:
        """Add every query of `events` to its session; return the number of queries."""
        count = 0
        for _, queries in events:
            for query in queries:
                self._tracker.update(query)
            count += len(queries)
        return count


class DetectStep:
    """Streaming features for every query, then the rules on each client touched (the latest detection per
    alert key is kept until the commit); the anomaly model runs on the touched clients at the commit.

    `observe_ratio`, when set (the pipeline's metrics), is told every judged client's score/threshold.
    """

    def __init__(
        self, tracker: FeatureTracker, detector: Detector, coordination: CoordinationTracker
    ) -> None:
        self.tracker = tracker
        self.detector = detector
        self.coordination = coordination
        self.observe_ratio: RatioObserver | None = None

    def process(self, events: list[Decoded], pending: PendingWork) -> None:
        """Update features with the queries of `events` and record the rules' detections in `pending`."""
        if not events:
            return
        touched = self.tracker.update([query for _, queries in events for query in queries])
        pending.touched |= touched
        for key in touched:
            client = self.tracker.get(key)
            if client is not None and client.queries - client.evaluated_at >= max(1, client.queries // 32):
                # A busy client is re-judged after each ~3% more of its traffic rather than every batch:
                # detection comes at most that much later, and snapshots stop dominating the cost.
                client.evaluated_at = client.queries
                values = client.snapshot()
                self.coordination.observe(key, client, values)
                for detection in self.detector.evaluate(key, client, values, observe=self.observe_ratio):
                    pending.record(detection)

    def at_commit(self, pending: PendingWork, watermark: float | None) -> None:
        """Score the clients touched since the last commit with the anomaly model (one micro-batch), and
        pool training-set hits across keys (coordination) up to event time `watermark`."""
        clients = {key: client for key in pending.touched if (client := self.tracker.get(key)) is not None}
        allowed = {entry.client_id for entry in self.detector.allowlist}
        horizon = watermark if watermark is not None else float("-inf")
        for detection in [
            *self.detector.evaluate_anomalies(clients, observe=self.observe_ratio),
            *self.coordination.detections(horizon, allowed),
        ]:
            pending.record(detection)


class Pipeline:
    """Runs the steps on each batch and owns the commit point (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Store,
        tracker: SessionTracker,
        decoder: RecordDecoder,
        detect: DetectStep,
        policy: CommitPolicy,
        metrics: Metrics,
        commit_positions: CommitPositions | None = None,
        publish_dead_letters: PublishDeadLetters | None = None,
        on_alerts: OnAlerts | None = None,
        on_notifications: Callable[[], None] | None = None,
        group_id: str = "",
        keep_raw_bytes: int = 4096,
        seen_events_retention_seconds: float = 72 * 3600.0,
        max_clock_skew_seconds: float | None = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.tracker = tracker
        self.policy = policy
        self.metrics = metrics
        self.stats = PipelineStats()
        self._decode = DecodeStep(decoder, keep_raw_bytes)
        self._deduplicate = DeduplicateStep(store, keep_raw_bytes)
        self._sessionize = SessionizeStep(tracker, store)
        self.detect = detect
        self._on_alerts = on_alerts
        self._on_notifications = on_notifications
        self._commit_positions = commit_positions
        self._publish_dead_letters = publish_dead_letters
        self._group_id = group_id
        self._retention = seen_events_retention_seconds
        self._clock = clock
        self._watermark = Watermark(max_clock_skew_seconds)
        self._held: deque[list[RawRecord]] = deque()
        self._pending = PendingWork(since=clock())
        self._resolved_at = clock()

    @property
    def uncommitted_records(self) -> int:
        """Records handed to `submit` whose results are not durable yet (held or pending)."""
        return self._pending.records + sum(len(batch) for batch in self._held)

    def submit(self, records: list[RawRecord]) -> None:
        """Accept one polled batch, then `resume`: process it (after any batch still held) and commit if the
        policy says it is due.

        Raises `StorageUnavailable` when the database cannot be read or written: the records are then held
        (or their results stay pending), and `resume` carries on where this stopped.
        """
        self.hold(records)
        self.resume()

    def hold(self, records: list[RawRecord]) -> None:
        """Keep one polled batch to process at the next `resume`, touching nothing now (while the database
        is known to be unavailable)."""
        if records:
            self._held.append(records)

    def resume(self) -> None:
        """Process every held batch, in order, then commit if due (see `submit`)."""
        self._process_held()
        self.maybe_commit()

    def flush(self) -> None:
        """Process every held batch and commit, due or not (at the end of a stream; repeat after a
        `StorageUnavailable`)."""
        self._process_held()
        self.commit()

    def _process_held(self) -> None:
        while self._held:
            self._process(self._held[0])
            self._held.popleft()

    def maybe_commit(self) -> bool:
        """Commit when due (call on idle polls too, so a quiet stream still commits); True if it did."""
        now = self._clock()
        if self.policy.due(self._pending.records, now - self._pending.since):
            self.commit()
            return True
        if now - self._resolved_at >= RESOLVE_INTERVAL_SECONDS:
            # A quiet stream commits nothing, yet its alerts must still resolve once quiet long enough.
            self._report(self.store.alerts.resolve_quiet(self._watermark.value), [])
            self._resolved_at = now
        return False

    def commit(self) -> None:
        """The commit point: publish dead letters, persist everything pending, then commit positions.

        Raises `StorageError` when the write fails; everything then stays pending for the next attempt.
        """
        started = time.perf_counter()
        pending = self._pending
        watermark = self._watermark.value
        if watermark is not None:
            pending.sessions_closed += self.tracker.close_idle(watermark)
        unpublished = pending.dead_letters[pending.dead_letters_published :]
        if unpublished and self._publish_dead_letters is not None:
            self._publish_dead_letters(unpublished)
            pending.dead_letters_published = len(pending.dead_letters)
        self.detect.at_commit(pending, watermark)
        detections = list(pending.detections.values())
        alerts = self.store.write(
            DurableBatch(
                seen_events=list(pending.seen_events.values()),
                sessions=self.tracker.changed(),
                dead_letters=pending.dead_letters,
                detections=detections,
                checkpoints=[
                    Checkpoint(self._group_id, topic, partition, offset)
                    for (topic, partition), offset in pending.positions.items()
                ],
                close_sessions_before=self.tracker.idle_horizon(watermark) if watermark is not None else None,
                forget_seen_after_seconds=self._retention,
                watermark=watermark,
            )
        )
        # Durable from here on: only now may anything leave the pending state.
        self.tracker.persisted()
        self._pending = PendingWork(since=self._clock())
        self._resolved_at = self._pending.since
        if self._commit_positions is not None:
            self._commit_positions(pending.positions)
        self._report(alerts, [pending.first_detections[d.dedup_key] for d in detections])
        self.stats.commits += 1
        self.metrics.commits.inc()
        self.metrics.sessions_closed.inc(pending.sessions_closed)
        self.metrics.active_sessions.set(len(self.tracker))
        self.metrics.commit_seconds.observe(time.perf_counter() - started)

    def _report(self, alerts: AlertUpdate, detections: list[Detection]) -> None:
        # `detections` are the first of their key since the last commit: an opened alert is reported with
        # the query count and event time at which its rule fired, not those of the commit.
        opened = [
            (change, detection)
            for change, detection in zip(alerts.changes, detections, strict=True)
            if change.change == "opened"
        ]
        for alert in alerts.resolved:
            self.metrics.alerts_resolved.labels(kind=alert.kind.value, severity=alert.severity.value).inc()
        if alerts.notifications and self._on_notifications is not None:
            self._on_notifications()
        for _, detection in opened:
            self.stats.alerts_opened[detection.kind.value] += 1
            self.metrics.alerts_opened.labels(
                kind=detection.kind.value, severity=detection.severity.value
            ).inc()
        if opened and self._on_alerts is not None:
            self._on_alerts(opened)

    def release_all(self) -> None:
        """Process what is held and commit (`flush`), then forget in-memory sessions: partitions are being
        revoked and may move elsewhere.

        Raises `StorageError` when that fails: call `discard` then.
        """
        self.flush()
        self.tracker.clear()
        self.metrics.active_sessions.set(0)

    def discard(self) -> int:
        """Drop every held batch and all pending work, and forget in-memory sessions; return how many
        records that was. For a source that will deliver those records again from the last committed
        positions (partitions revoked while the database was unreachable)."""
        dropped = self.uncommitted_records
        self._held.clear()
        self._pending = PendingWork(since=self._clock())
        self.tracker.clear()
        self.metrics.active_sessions.set(0)
        return dropped

    def _process(self, records: list[RawRecord]) -> None:
        # Storage is read first (sessions to restore, events already seen), so that a database failure
        # leaves the batch unprocessed and nothing counted; only then does any state change.
        pending = self._pending
        decoded, dead_letters = self._decode.process(records)
        self._sessionize.restore(decoded)
        fresh, duplicates, conflicts = self._deduplicate.process(decoded, pending.seen_events)
        dead_letters += conflicts
        queries = self._sessionize.process(fresh)
        self.detect.process(fresh, pending)
        for record, event in fresh:
            self._watermark.observe(event[0].timestamp, record.received_at)
        pending.dead_letters += dead_letters
        for record in records:
            origin = record.origin
            if origin.kind == "kafka":
                pending.positions[(origin.name, origin.partition)] = origin.position + 1
        pending.records += len(records)
        stats = self.stats
        stats.records += len(records)
        stats.events += len(fresh)
        stats.queries += queries
        stats.duplicates += duplicates
        stats.dead_letters.update(letter.reason.value for letter in dead_letters)
        metrics = self.metrics
        for letter in dead_letters:
            metrics.dead_letters.labels(reason=letter.reason.value).inc()
        metrics.events_consumed.labels(source=records[0].origin.kind).inc(len(records))
        metrics.queries.inc(queries)
        metrics.duplicate_events.inc(duplicates)
        metrics.observe_processed(
            [event[0].timestamp for _, event in fresh], [record.received_at for record in records]
        )
