"""The pipeline: the chain of steps run on each polled batch, and the commit point.

    raw records ─> Decode ─> Deduplicate ─> Restore ─> Sessionize ─> Detect ─┐ pending until the commit:
       (bad records ─> dead letters)                                         └─> Judge ─> Alert lifecycle ─┐
                                                                           Commit positions <─ Persist <─┘

Each batch's results stay pending until the commit policy says the commit is due, or the batch holds a
detection that fired for a key with no open alert (a new alert waits for no policy). Then, in order: dead
letters are published (if a dead-letter topic is configured); the anomaly model judges the clients as the
rules judged them since the last commit; in one database transaction the alert lifecycle opens, updates and
resolves alerts (queueing their notifications) and everything else pending (sessions, the features of
every client changed, dead letters, seen events, checkpoints) is written; only then are the source's
positions committed. Stored features are exactly as of the positions committed with them: whoever reads on
from those positions (this process after a restart, the new owner of a partition) goes on from them as if
nothing had stopped. A crash at any point re-delivers at most what was not yet committed, and event-id
de-duplication makes re-delivered events change nothing: at-least-once delivery, exactly-once effect.

A pipeline fed by a consumer group is told the lease epoch of each partition assigned to it (`claimed`), and
every commit first holds those leases (fencing, see `detector.storage.repository`). A member that lost a
partition without knowing it yet is refused there: it stores nothing, drops everything pending and
in memory (the new owner reads those records again from the stored positions), and raises `Fenced` for its
source to rejoin the group. The pools of training-set hits that sybil keys split over partitions make
together are exchanged in the same transaction (`detector.scoring.coordination`), so a campaign is judged
whole however its keys are spread over the members.

Nothing leaves the pending state before the transaction is durable. When the database is unreachable a
batch's reads fail before any step counted anything (see `detector.pipeline.steps`), and the batch is
held; a failed write leaves everything pending. Both raise `StorageUnavailable`, a `Backpressure`: the
source holds its records, and `resume` carries on where the pipeline stopped. Too many undelivered
notifications raise `OutboxFull`, another `Backpressure`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from detector.alerts.lifecycle import AlertChange, AlertLifecycle, AlertOutcome
from detector.domain import (
    Alert,
    AlertStatus,
    Backpressure,
    DeadLetter,
    Detection,
    RawRecord,
    add_to_incidents,
)
from detector.eventtime import Partition, Watermark
from detector.metrics import Metrics
from detector.pipeline.steps import Batch, DetectStep, Step
from detector.sessions import SessionTracker
from detector.storage import Checkpoint, DurableBatch, Fenced, SeenEvent, Store, StoredClientState

log = logging.getLogger(__name__)

Positions = dict[tuple[str, int], int]

# How often a pipeline with nothing to commit still resolves the alerts that have gone quiet.
RESOLVE_INTERVAL_SECONDS = 10.0


class OutboxFull(Backpressure):
    """More notifications wait for their sinks than the outbox may hold: hold the source until they drain."""


# -- what the pipeline reports to and commits through (the source, the sinks, the terminal) -----------------


class PositionCommitter(Protocol):
    """Commits source positions (next offsets) once what came before them is durable."""

    def commit(self, positions: Mapping[tuple[str, int], int]) -> None: ...


class DeadLetterPublisher(Protocol):
    """Publishes dead letters (a dead-letter topic); called before the commit that stores them."""

    def publish(self, letters: Sequence[DeadLetter]) -> None: ...


class AlertListener(Protocol):
    """Told of every alert opened, and of every open alert whose severity rose, with the detection that did
    it (the terminal, an evaluation)."""

    def opened(self, alerts: list[tuple[AlertChange, Detection]]) -> None: ...

    def escalated(self, alerts: list[tuple[AlertChange, Detection]]) -> None: ...


class Outbox(Protocol):
    """The notifications' way out: the sinks it delivers to, whether it is over its limit, and a nudge when
    a commit queued more."""

    @property
    def sink_names(self) -> list[str]: ...

    @property
    def backlogged(self) -> bool: ...

    def wake(self) -> None: ...


@dataclass(frozen=True)
class Outputs:
    """Where the pipeline's results go besides the database; any of them may be absent."""

    positions: PositionCommitter | None = None
    dead_letters: DeadLetterPublisher | None = None
    alerts: AlertListener | None = None
    outbox: Outbox | None = None


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

    def summary(self) -> str:
        """One line on what was processed: records, events, queries, duplicates, dead letters (by reason)
        and alerts opened."""
        dead = sum(self.dead_letters.values())
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.dead_letters.items()))
        return (
            f"{self.records} records: {self.events} events, {self.queries} queries, "
            f"{self.duplicates} duplicates skipped, {dead} dead letters"
            + (f" ({reasons})" if reasons else "")
            + f", {sum(self.alerts_opened.values())} alerts opened"
        )


@dataclass
class PendingWork:
    """What has been processed since the last commit and must become durable with it."""

    seen_events: dict[str, SeenEvent] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    dead_letters_published: int = 0  # how many of `dead_letters` the dead-letter topic already has
    positions: Positions = field(default_factory=dict)
    # The incidents of each alert key, each its detections combined (`add_to_incidents`), oldest first.
    incidents: dict[str, list[Detection]] = field(default_factory=dict)
    sessions_closed: int = 0
    records: int = 0
    since: float = 0.0
    urgent: bool = False  # a detection fired for a key with no alert open: commit now, not when due

    def record(self, detection: Detection, quiet_seconds: float) -> None:
        """Add `detection` to the incidents of its alert key (an incident goes quiet after `quiet_seconds`
        of event time without a detection)."""
        add_to_incidents(self.incidents.setdefault(detection.dedup_key, []), detection, quiet_seconds)

    def detections(self) -> list[Detection]:
        """Every incident pending, as one detection each, in the order of their keys' first detection."""
        return [incident for incidents in self.incidents.values() for incident in incidents]


def leases_held(claimed: Mapping[tuple[str, int], int], positions: Positions) -> dict[tuple[str, int], int]:
    """The leases a commit of `positions` holds: every partition `claimed`, and each partition committed
    (epoch 0, refused, for one never claimed). All claimed, not only those committed: the sessions closed and
    the alerts resolved in a commit are of every partition, and a member that lost any of its partitions has
    missed a rebalance."""
    return {partition: 0 for partition in positions} | dict(claimed)


class Pipeline:
    """Runs `steps` on each batch and owns the commit point (see the module docstring).

    `detect` (the last of the steps) also judges at the commit; `sessions` is the Sessionize step's tracker,
    closed for idleness and persisted at the commit. Checkpoints are stored under `group_id`; seen event ids
    are remembered `seen_retention_seconds` after they were processed.
    """

    def __init__(
        self,
        steps: Sequence[Step],
        *,
        detect: DetectStep,
        sessions: SessionTracker,
        lifecycle: AlertLifecycle,
        store: Store,
        policy: CommitPolicy,
        metrics: Metrics,
        outputs: Outputs | None = None,
        watermark: Watermark | None = None,
        group_id: str = "",
        seen_retention_seconds: float = 72 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.steps = list(steps)
        self.detect = detect
        self.sessions = sessions
        self.lifecycle = lifecycle
        self.store = store
        self.policy = policy
        self.metrics = metrics
        self.outputs = outputs or Outputs()
        self.stats = PipelineStats()
        self._watermark = watermark or Watermark(max_skew_seconds=None)
        self._group_id = group_id
        self._retention = seen_retention_seconds
        self._clock = clock
        self._held: deque[list[RawRecord]] = deque()
        self._pending = PendingWork(since=clock())
        self._resolved_at = clock()
        self._quiet_seconds = lifecycle.policy.resolve_after_seconds
        # The keys of the alerts open, as far as this pipeline has seen: a detection of another key makes
        # the commit urgent, so a new alert is raised at once rather than when the policy says.
        self._open_keys: set[str] = set()
        # The partition each recent client's records come from (records are keyed by client): its alerts
        # go quiet in that partition's event time, which no other partition read ahead can move.
        self._partitions: OrderedDict[tuple[str, str], Partition] = OrderedDict()
        self._max_clients = detect.tracker.max_clients
        self._clients_admitted = self._clients_evicted = 0  # the feature tracker's totals, as last reported
        self._exposure_reported: dict[str, float] = {}  # and its exposure's
        # The lease epoch of each partition assigned (`claimed`); None until a claim: not fenced at all.
        self._leases: dict[tuple[str, int], int] | None = None

    @property
    def uncommitted_records(self) -> int:
        """Records handed to the pipeline whose results are not durable yet (held or pending)."""
        return self._pending.records + sum(len(batch) for batch in self._held)

    def submit(self, records: list[RawRecord]) -> None:
        """Accept one polled batch, then `resume`: process it (after any batch still held) and commit if the
        policy says it is due.

        Raises `Backpressure` when the pipeline cannot go on now: `StorageUnavailable` (the records are held,
        or their results stay pending) or `OutboxFull` (the records are held, unprocessed); `resume` later
        carries on where this stopped. Raises `Fenced` when a commit was refused (see `commit`).
        """
        self.hold(records)
        self.resume()

    def hold(self, records: list[RawRecord]) -> None:
        """Keep one polled batch to process at the next `resume`, touching nothing now (while the pipeline is
        known to be under back-pressure)."""
        if records:
            self._held.append(records)

    def resume(self) -> None:
        """Process every held batch, in order, then commit if due (see `submit`)."""
        outbox = self.outputs.outbox
        if self._held and outbox is not None and outbox.backlogged:
            raise OutboxFull("more undelivered notifications than the outbox limit", retry_after=0.5)
        self._process_held()
        self.maybe_commit()

    def flush(self) -> None:
        """Process every held batch and commit, due or not (at the end of a stream; repeat after a
        `StorageUnavailable`)."""
        self._process_held()
        self.commit()

    def lag(self, behind: Mapping[tuple[str, int], int]) -> None:
        """Note how many records each (topic, partition) of the source has still to be read, for the stream's
        event time (see `detector.eventtime`); ignored while records are held unprocessed."""
        if not self._held:
            self._watermark.lag(behind)

    def maybe_commit(self) -> bool:
        """Commit when due (call on idle polls too, so a quiet stream still commits); True if it did."""
        now = self._clock()
        pending = self._pending
        if pending.urgent or self.policy.due(pending.records, now - pending.since):
            self.commit()
            return True
        if now - self._resolved_at >= RESOLVE_INTERVAL_SECONDS:
            # A quiet stream commits nothing and its event time stands still, yet its alerts must still
            # resolve once quiet long enough: in wall time.
            with self.store.transaction("resolving quiet alerts") as transaction:
                outcome = self.lifecycle.apply(
                    transaction.alerts, [], self._watermark.front, alert_watermark=self._alert_watermark
                )
            self._report(outcome)
            self._resolved_at = now
        return False

    def claimed(self, epochs: Mapping[tuple[str, int], int]) -> None:
        """Partitions assigned to this pipeline's source, with the epochs of the leases claimed for them:
        from now on every commit holds the leases of all of them (and of every partition it commits positions
        for), and is refused if another member claimed one since."""
        self._leases = {**(self._leases or {}), **epochs}

    def commit(self) -> None:
        """The commit point: publish dead letters, judge, run the alert lifecycle and persist everything
        pending in one transaction, then commit positions.

        Raises `StorageError` when the transaction fails; everything then stays pending for the next attempt.
        Raises `Fenced` when another member claimed one of the partitions: everything pending and in memory is
        dropped then (`discard`), as its new owner reads it again.
        """
        started = time.perf_counter()
        pending = self._pending
        watermark = self._watermark.value
        if watermark is not None:
            pending.sessions_closed += self.sessions.close_idle(watermark)
        unpublished = pending.dead_letters[pending.dead_letters_published :]
        if unpublished and self.outputs.dead_letters is not None:
            self.outputs.dead_letters.publish(unpublished)
            pending.dead_letters_published = len(pending.dead_letters)
        for detection in self.detect.judge(watermark):
            pending.record(detection, self._quiet_seconds)
        tracker = self.detect.tracker
        stored = self.detect.stored is not None
        changed = tracker.changed() if stored else {}
        learned = tracker.embedder.learned() if stored else {}
        batch = DurableBatch(
            seen_events=list(pending.seen_events.values()),
            sessions=self.sessions.changed(),
            dead_letters=pending.dead_letters,
            checkpoints=[
                Checkpoint(self._group_id, topic, partition, offset)
                for (topic, partition), offset in pending.positions.items()
            ],
            client_states=[
                StoredClientState(
                    model,
                    client_id,
                    features.to_bytes(),
                    features.last_seen,
                    features.first_seen,
                    features.exposure.exposure(),
                )
                for (model, client_id), features in changed.items()
            ],
            model_scales={model: scale.to_bytes() for model, scale in learned.items()},
            close_sessions_before=self.sessions.idle_horizon(watermark) if watermark is not None else None,
            forget_seen_after_seconds=self._retention,
        )
        try:
            with self.store.transaction() as transaction:
                if self._leases is not None:
                    # First, so that no other row is locked while a claimer holds a lease.
                    transaction.hold_leases(self._group_id, leases_held(self._leases, pending.positions))
                # Then the pools shared with the other members (locked before any alert is).
                for detection in self.detect.coordination.exchange(transaction):
                    pending.record(detection, self._quiet_seconds)
                # Event time alone resolves alerts here: the stream is flowing, and a backlog read for longer
                # than the quiet period must not resolve the alerts of partitions not read yet.
                outcome = self.lifecycle.apply(
                    transaction.alerts,
                    pending.detections(),
                    self._watermark.front,
                    wall_clock=False,
                    alert_watermark=self._alert_watermark,
                )
                transaction.write(batch)
        except Fenced:
            self.metrics.fenced_commits.inc()
            self.discard()
            raise
        # Durable from here on: only now may anything leave the pending state.
        self.sessions.persisted()
        tracker.stored(changed.keys())
        if watermark is not None:
            # Idle as their sessions are: stored now, so that memory holds the active clients only.
            self.metrics.clients_released.inc(self.detect.release_idle(self.sessions.idle_horizon(watermark)))
            self.metrics.tracked_clients.set(len(tracker))
        tracker.embedder.stored(learned.keys())
        self.detect.coordination.persisted()
        self._pending = PendingWork(since=self._clock())
        self._resolved_at = self._pending.since
        if self.outputs.positions is not None:
            self.outputs.positions.commit(pending.positions)
        self._report(outcome)
        self.stats.commits += 1
        self.metrics.commits.inc()
        self.metrics.sessions_closed.inc(pending.sessions_closed)
        self.metrics.active_sessions.set(len(self.sessions))
        self.metrics.commit_seconds.observe(time.perf_counter() - started)

    def release_all(self) -> None:
        """Process what is held and commit (`flush`), then forget in-memory sessions and features:
        partitions are being revoked and may move elsewhere, their new owner going on from what is stored.

        Raises `StorageError` when that fails: call `discard` then (`Fenced` has discarded already).
        """
        self.flush()
        self.sessions.clear()
        self.detect.forget()
        if self._leases is not None:
            self._leases = {}
        self._watermark.release()
        self.metrics.active_sessions.set(0)

    def discard(self) -> int:
        """Drop every held batch and all pending work, and forget in-memory sessions; return how many
        records that was. For a source that will deliver those records again from the last committed
        positions (partitions revoked while the database was unreachable)."""
        dropped = self.uncommitted_records
        self._held.clear()
        self._pending = PendingWork(since=self._clock())
        self.sessions.clear()
        self.detect.forget()
        if self._leases is not None:
            self._leases = {}
        self._watermark.release()
        self.metrics.active_sessions.set(0)
        return dropped

    # -- internals ---------------------------------------------------------------------------------------

    def _process_held(self) -> None:
        while self._held:
            self._process(self._held[0])
            self._held.popleft()

    def _process(self, records: list[RawRecord]) -> None:
        pending = self._pending
        batch = Batch(records, already_seen=pending.seen_events)
        for step in self.steps:
            batch = step.process(batch)
        # Every step succeeded: the batch's results join the pending work.
        for seen in batch.seen:
            pending.seen_events[seen.event_id] = seen
        pending.dead_letters += batch.dead_letters
        for detection in batch.detections:
            pending.record(detection, self._quiet_seconds)
            if (
                detection.fired
                and detection.dedup_key not in self._open_keys
                and not self.lifecycle.allowlisted(detection)
            ):
                pending.urgent = True
        for record, queries in batch.fresh:
            origin = record.origin
            partition = (origin.name, origin.partition) if origin.kind == "kafka" else None
            self._watermark.observe(queries[0].timestamp, record.received_at, partition)
            client = (queries[0].model, queries[0].client_id)
            self._partitions[client] = partition
            self._partitions.move_to_end(client)
        while len(self._partitions) > self._max_clients:
            self._partitions.popitem(last=False)
        for record in records:
            origin = record.origin
            if origin.kind == "kafka":
                pending.positions[(origin.name, origin.partition)] = origin.position + 1
        pending.records += len(records)
        self._count(batch)

    def _count(self, batch: Batch) -> None:
        stats, metrics = self.stats, self.metrics
        stats.records += len(batch.records)
        stats.events += len(batch.fresh)
        stats.queries += batch.queries
        stats.duplicates += batch.duplicates
        stats.dead_letters.update(letter.reason.value for letter in batch.dead_letters)
        for letter in batch.dead_letters:
            metrics.dead_letters.labels(reason=letter.reason.value).inc()
        metrics.events_consumed.labels(source=batch.records[0].origin.kind).inc(len(batch.records))
        metrics.queries.inc(batch.queries)
        metrics.duplicate_events.inc(batch.duplicates)
        metrics.observe_processed(
            [queries[0].timestamp for _, queries in batch.fresh],
            [record.received_at for record in batch.records],
        )
        tracker = self.detect.tracker
        metrics.tracked_clients.set(len(tracker))
        metrics.new_clients.inc(tracker.admitted - self._clients_admitted)
        metrics.client_evictions.inc(tracker.evicted - self._clients_evicted)
        self._clients_admitted, self._clients_evicted = tracker.admitted, tracker.evicted
        exposure = tracker.exposure.values()
        for kind, total in exposure.items():
            metrics.exposure.labels(kind=kind).inc(total - self._exposure_reported.get(kind, 0.0))
        self._exposure_reported = exposure

    def _alert_watermark(self, alert: Alert) -> float | None:
        """How far the stream has got for `alert`: the least event time of its clients' partitions (the
        stream's watermark for a client not seen since this process started)."""
        times = []
        for client_id in alert.client_ids:
            client = (alert.model, client_id)
            if client not in self._partitions:
                return self._watermark.value
            times.append(self._watermark.of(self._partitions[client]))
        return min((time for time in times if time is not None), default=self._watermark.value)

    def _report(self, outcome: AlertOutcome) -> None:
        opened = [(change, detection) for detection, change in outcome.opened]
        self._open_keys.update(
            change.alert.dedup_key for _, change in outcome.changes if change.alert.status is AlertStatus.OPEN
        )
        self._open_keys.difference_update(alert.dedup_key for alert in outcome.resolved)
        for alert in outcome.resolved:
            self.metrics.alerts_resolved.labels(kind=alert.kind.value, severity=alert.severity.value).inc()
        if outcome.notifications and self.outputs.outbox is not None:
            self.outputs.outbox.wake()
        for _, detection in opened:
            self.stats.alerts_opened[detection.kind.value] += 1
            self.metrics.alerts_opened.labels(
                kind=detection.kind.value, severity=detection.severity.value
            ).inc()
        escalated = [(change, detection) for detection, change in outcome.escalated]
        if self.outputs.alerts is not None:
            if opened:
                self.outputs.alerts.opened(opened)
            if escalated:
                self.outputs.alerts.escalated(escalated)
