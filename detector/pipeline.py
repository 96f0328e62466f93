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
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from detector.alerts.model import Detection
from detector.features.client import ClientKey, FeatureTracker
from detector.ingest.decode import RecordDecoder
from detector.ingest.records import DeadLetter, InvalidRecord, RawRecord
from detector.metrics import Metrics
from detector.model import Query
from detector.scoring.coordination import CoordinationTracker
from detector.scoring.detector import Detector, RatioObserver
from detector.sessions import SessionTracker
from detector.storage import Checkpoint, DurableBatch, Store
from detector.storage.alerts import AlertChange, AlertUpdate

log = logging.getLogger(__name__)

Positions = dict[tuple[str, int], int]
CommitPositions = Callable[[Mapping[tuple[str, int], int]], None]
PublishDeadLetters = Callable[[list[DeadLetter]], None]
OnAlerts = Callable[[list[tuple[AlertChange, Detection]]], None]

# How often a pipeline with nothing to commit still resolves the alerts that have gone quiet.
RESOLVE_INTERVAL_SECONDS = 10.0


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

    seen_events: dict[str, float] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    positions: Positions = field(default_factory=dict)
    detections: dict[str, Detection] = field(default_factory=dict)  # the latest per alert key: stored
    first_detections: dict[str, Detection] = field(default_factory=dict)  # the first: when it fired
    touched: set[ClientKey] = field(default_factory=set)
    records: int = 0
    since: float = 0.0

    def record(self, detection: Detection) -> None:
        """Keep `detection` as the latest of its alert key, and as the first if it is."""
        self.detections[detection.dedup_key] = detection
        self.first_detections.setdefault(detection.dedup_key, detection)


class DecodeStep:
    """Raw records to queries; a record that cannot be decoded becomes a dead letter and the batch goes on."""

    def __init__(self, decoder: RecordDecoder, keep_raw_bytes: int, metrics: Metrics) -> None:
        self._decoder = decoder
        self._keep_raw_bytes = keep_raw_bytes
        self._metrics = metrics

    def process(self, records: list[RawRecord], dead_letters: list[DeadLetter]) -> list[list[Query]]:
        """The queries of each decodable record (one list per record); dead letters appended."""
        decoded: list[list[Query]] = []
        for record in records:
            try:
                decoded.append(self._decoder.decode(record))
            except InvalidRecord as error:
                dead_letters.append(DeadLetter.from_record(record, error, self._keep_raw_bytes))
                self._metrics.dead_letters.labels(reason=error.reason.value).inc()
        return decoded


class DeduplicateStep:
    """Drops events already processed: earlier in this commit, or durably before (by event_id)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def process(self, events: list[list[Query]], seen: dict[str, float]) -> tuple[list[list[Query]], int]:
        """The events not seen before (recorded in `seen`), and how many duplicates were dropped."""
        candidates = {queries[0].event_id for queries in events if queries[0].event_id not in seen}
        unseen = self._store.unseen_event_ids(candidates) if candidates else set()
        fresh: list[list[Query]] = []
        for queries in events:
            event_id = queries[0].event_id
            if event_id in unseen and event_id not in seen:
                seen[event_id] = queries[0].timestamp
                fresh.append(queries)
        return fresh, len(events) - len(fresh)


class SessionizeStep:
    """Counts queries into their (model, client) sessions, first restoring sessions held only in storage."""

    def __init__(self, tracker: SessionTracker, store: Store) -> None:
        self._tracker = tracker
        self._store = store

    def process(self, events: list[list[Query]]) -> int:
        """Add every query of `events` to its session; return the number of queries."""
        missing = self._tracker.missing({(queries[0].model, queries[0].client_id) for queries in events})
        if missing:
            for session in self._store.latest_sessions(missing):
                self._tracker.restore(session)
        count = 0
        for queries in events:
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
        self._watermark = float("-inf")

    def process(self, events: list[list[Query]], pending: PendingWork) -> None:
        """Update features with the queries of `events` and record the rules' detections in `pending`."""
        if not events:
            return
        touched = self.tracker.update([query for queries in events for query in queries])
        pending.touched |= touched
        for key in touched:
            client = self.tracker.get(key)
            if client is not None and client.queries - client.evaluated_at >= max(1, client.queries // 32):
                # A busy client is re-judged after each ~3% more of its traffic rather than every batch:
                # detection comes at most that much later, and snapshots stop dominating the cost.
                client.evaluated_at = client.queries
                self._watermark = max(self._watermark, client.last_seen)
                values = client.snapshot()
                self.coordination.observe(key, client, values)
                for detection in self.detector.evaluate(key, client, values, observe=self.observe_ratio):
                    pending.record(detection)

    def at_commit(self, pending: PendingWork) -> None:
        """Score the clients touched since the last commit with the anomaly model (one micro-batch), and
        pool training-set hits across keys (coordination)."""
        clients = {key: client for key in pending.touched if (client := self.tracker.get(key)) is not None}
        allowed = {entry.client_id for entry in self.detector.allowlist}
        for detection in [
            *self.detector.evaluate_anomalies(clients, observe=self.observe_ratio),
            *self.coordination.detections(self._watermark, allowed),
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.tracker = tracker
        self.policy = policy
        self.metrics = metrics
        self.stats = PipelineStats()
        self._decode = DecodeStep(decoder, keep_raw_bytes, metrics)
        self._deduplicate = DeduplicateStep(store)
        self._sessionize = SessionizeStep(tracker, store)
        self.detect = detect
        self._on_alerts = on_alerts
        self._on_notifications = on_notifications
        self._commit_positions = commit_positions
        self._publish_dead_letters = publish_dead_letters
        self._group_id = group_id
        self._retention = seen_events_retention_seconds
        self._clock = clock
        self._pending = PendingWork(since=clock())
        self._resolved_at = clock()

    def submit(self, records: list[RawRecord]) -> None:
        """Process one polled batch, then commit if the policy says it is due."""
        if records:
            self._process(records)
        self.maybe_commit()

    def maybe_commit(self) -> bool:
        """Commit when due (call on idle polls too, so a quiet stream still commits); True if it did."""
        now = self._clock()
        if self.policy.due(self._pending.records, now - self._pending.since):
            self.commit()
            return True
        if now - self._resolved_at >= RESOLVE_INTERVAL_SECONDS:
            # A quiet stream commits nothing, yet its alerts must still resolve once quiet long enough.
            self._resolved_at = now
            self._report(self.store.alerts.resolve_quiet(self._watermark()), [])
        return False

    def commit(self) -> None:
        """The commit point: publish dead letters, persist everything pending, then commit positions."""
        started = time.perf_counter()
        pending = self._pending
        closed = self.tracker.close_idle()
        sessions = self.tracker.drain_changed()
        if pending.dead_letters and self._publish_dead_letters is not None:
            self._publish_dead_letters(pending.dead_letters)
        self.detect.at_commit(pending)
        detections = list(pending.detections.values())
        watermark = self._watermark()
        alerts = self.store.write(
            DurableBatch(
                seen_events=list(pending.seen_events.items()),
                sessions=sessions,
                dead_letters=pending.dead_letters,
                detections=detections,
                checkpoints=[
                    Checkpoint(self._group_id, topic, partition, offset)
                    for (topic, partition), offset in pending.positions.items()
                ],
                close_sessions_before=self.tracker.idle_horizon if watermark is not None else None,
                prune_seen_before=watermark - self._retention if watermark is not None else None,
                watermark=watermark,
            )
        )
        if self._commit_positions is not None:
            self._commit_positions(pending.positions)
        self._pending = PendingWork(since=self._clock())
        self._resolved_at = self._pending.since
        self._report(alerts, [pending.first_detections[d.dedup_key] for d in detections])
        self.stats.commits += 1
        self.metrics.commits.inc()
        self.metrics.sessions_closed.inc(closed)
        self.metrics.active_sessions.set(len(self.tracker))
        self.metrics.commit_seconds.observe(time.perf_counter() - started)

    def _watermark(self) -> float | None:
        watermark = self.tracker.watermark
        return None if watermark == float("-inf") else watermark

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
        """Commit, then forget in-memory sessions: partitions are being revoked and may move elsewhere."""
        self.commit()
        self.tracker.clear()
        self.metrics.active_sessions.set(0)

    def _process(self, records: list[RawRecord]) -> None:
        pending = self._pending
        dead_before = len(pending.dead_letters)
        decoded = self._decode.process(records, pending.dead_letters)
        fresh, duplicates = self._deduplicate.process(decoded, pending.seen_events)
        queries = self._sessionize.process(fresh)
        self.detect.process(fresh, pending)
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
        stats.dead_letters.update(letter.reason.value for letter in pending.dead_letters[dead_before:])
        self.metrics.events_consumed.labels(source=records[0].origin.kind).inc(len(records))
        self.metrics.queries.inc(queries)
        self.metrics.duplicate_events.inc(duplicates)
        self.metrics.observe_processed(
            [event[0].timestamp for event in fresh], [record.received_at for record in records]
        )
