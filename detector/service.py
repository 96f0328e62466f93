"""Wiring: builds the pipeline from the settings and drives it from a source (the daemon, a replay)."""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from types import FrameType

import numpy as np
import orjson
from kafka.errors import KafkaError
from sqlalchemy import Engine

from detector.alerts.dispatcher import Dispatcher, RetryPolicy
from detector.alerts.lifecycle import NotificationPolicy
from detector.alerts.model import AlertKind
from detector.alerts.sinks import build_sinks, configured_sink_names
from detector.features.client import FeatureTracker, TrainingIndexes, TrainingLookup
from detector.features.embedding import ModelScale, QueryEmbedder
from detector.ingest.decode import RecordDecoder
from detector.ingest.jsonl import read_jsonl_batches
from detector.ingest.kafka import KafkaPublisher, KafkaSource
from detector.ingest.records import DeadLetter, InvalidRecord, RawRecord
from detector.metrics import Metrics
from detector.model import Query
from detector.pipeline import CommitPolicy, DetectStep, OnAlerts, Pipeline, PipelineStats
from detector.scoring.calibrate import fit_scoring_model
from detector.scoring.coordination import CoordinationTracker
from detector.scoring.detector import AllowEntry, Detector
from detector.scoring.model import ScoringModel
from detector.scoring.rules import load_rules
from detector.sessions import SessionTracker
from detector.settings import Settings
from detector.storage import AlertStore, OutboxStore, Store, create_engine_for, upgrade
from detector.storage.errors import StorageError, StorageFailed, StorageUnavailable

log = logging.getLogger(__name__)

Progress = Callable[[list[RawRecord]], None]

# How long a stopping daemon (or a finished replay) waits for due notifications to be delivered.
DRAIN_SECONDS = 10.0
# How often a daemon whose outbox is over its limit looks again before resuming consumption.
BACKPRESSURE_POLL_SECONDS = 0.5
# How often the consumer loop exports its lag (read from the last fetch: no broker round trip).
LAG_INTERVAL_SECONDS = 1.0


def prepare_process() -> None:
    """Tune this process for stream processing: one BLAS thread, a cheaper garbage collector."""
    limit_blas_threads()
    tune_garbage_collector()


def limit_blas_threads() -> None:
    """Run numpy's linear algebra on one thread.

    The detector multiplies small matrices (a micro-batch by a projection) all the time; with a thread pool
    per call on a busy 2-core machine the same product took 8 times longer than on one thread. Scale out
    with processes in the consumer group instead.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def tune_garbage_collector() -> None:
    """Make the cyclic garbage collector cheap for a long-running stream processor.

    Decoding allocates a few dozen short-lived objects per record and creates almost no reference cycles,
    yet the default thresholds run a collection every 700 allocations, each traversing the young objects
    and, every so often, every live session. Freezing what exists at start (modules, settings) and running
    the young generation less often saved about 7% of the per-record cost in the throughput benchmark.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def open_engine(settings: Settings, migrate: bool | None = None) -> Engine:
    """An engine on the configured database, migrated to the latest schema unless told otherwise."""
    engine = create_engine_for(
        settings.database.url.get_secret_value(), busy_timeout_seconds=settings.database.busy_timeout_seconds
    )
    if settings.database.migrate_on_start if migrate is None else migrate:
        upgrade(engine)
    return engine


def notification_policy(settings: Settings, sinks: Sequence[str] = ()) -> NotificationPolicy:
    """The alert lifecycle of the settings, notifying `sinks`."""
    return NotificationPolicy(
        sinks=tuple(sinks),
        renotify_seconds=settings.alerts.renotify_seconds,
        resolve_after_seconds=settings.alerts.resolve_after_seconds,
        dashboard_url=settings.dashboard.url,
    )


def open_store(settings: Settings, migrate: bool | None = None, sinks: Sequence[str] = ()) -> Store:
    """The store at the configured database URL (see `open_engine`), its alert changes notifying `sinks`."""
    return Store(open_engine(settings, migrate), policy=notification_policy(settings, sinks))


def open_alert_store(settings: Settings, migrate: bool | None = None) -> AlertStore:
    """The alert store at the configured database URL, notifying every configured sink."""
    sinks = configured_sink_names(settings)
    return AlertStore(open_engine(settings, migrate), policy=notification_policy(settings, sinks))


@contextmanager
def persisting(settings: Settings, metrics: Metrics) -> Iterator[tuple[Store, Dispatcher | None]]:
    """For the block: the store, its alert changes notifying every configured sink, and a started
    dispatcher delivering them from the outbox (None without sinks).

    On the way out the dispatcher is given `DRAIN_SECONDS` to deliver what is due; anything left stays in
    the outbox for the next start.
    """
    sinks = build_sinks(settings)
    with open_store(settings, sinks=[sink.name for sink in sinks]) as store:
        if not sinks:
            yield store, None
            return
        dispatcher = Dispatcher(
            OutboxStore(store.engine),
            sinks,
            metrics,
            retry=RetryPolicy(settings.alerts.retry_initial_seconds, settings.alerts.retry_max_seconds),
            max_pending=settings.alerts.outbox_max_pending,
        )
        dispatcher.start()
        log.info("delivering alerts to %s", ", ".join(dispatcher.sink_names))
        try:
            yield store, dispatcher
        finally:
            if not dispatcher.drain(DRAIN_SECONDS):
                log.warning("notifications still pending: they are delivered at the next start")
            dispatcher.close()


def load_scoring_model(settings: Settings) -> ScoringModel | None:
    """The scoring model at `MIA_MODEL_PATH`, if configured (hash-checked, never unpickled)."""
    if settings.model_path is None:
        return None
    model = ScoringModel.load(settings.model_path)
    log.info("scoring model %s (target FPR %g)", model.version, model.target_fpr)
    return model


def load_training_indexes(settings: Settings) -> TrainingIndexes:
    """The training-set indexes at `MIA_TRAINING_INDEX`: one file (for every model of its width), or a
    directory of `<model name>.npz` files. Keys come from `MIA_TRAINING_INDEX_KEY` when not in the files."""
    path = settings.training_index
    if path is None:
        return TrainingIndexes()
    from detector.features.training import TrainingSetIndex

    secret = settings.training_index_key
    key = bytes.fromhex(secret.get_secret_value()) if secret is not None else None
    if path.is_dir():
        by_model: dict[str, TrainingLookup] = {
            file.stem: TrainingSetIndex.load(file, key=key) for file in sorted(path.glob("*.npz"))
        }
        log.info("training-set indexes for models %s", sorted(by_model))
        return TrainingIndexes(by_model)
    index = TrainingSetIndex.load(path, key=key)
    log.info("training-set index of %d rows of width %d", index.size, index.width)
    return TrainingIndexes(default=index)


def build_detection(
    settings: Settings, model: ScoringModel | None = None, indexes: TrainingIndexes | None = None
) -> DetectStep:
    """The detection step: features (scaled as the model was trained, if any), rules, model, allow-list."""
    scales = {
        name: ModelScale.fixed(np.asarray(scale["mean"]), np.asarray(scale["std"]))
        for name, scale in (model.scales.items() if model else ())
    }
    tracker = FeatureTracker(QueryEmbedder(scales), indexes, settings.detection.max_clients)
    allowlist = [
        AllowEntry(entry.client_id, entry.reason, AlertKind(entry.kind) if entry.kind else None)
        for entry in settings.detection.allowlist
    ]
    detector = Detector(load_rules(settings.detection.rules_path), model, allowlist)
    training_rule = next(rule for rule in detector.rules if rule.kind is AlertKind.TRAINING_SET_TARGETING)
    return DetectStep(tracker, detector, CoordinationTracker(detector.threshold(training_rule)))


def build_pipeline(
    settings: Settings,
    store: Store,
    metrics: Metrics,
    *,
    commit_positions: Callable[..., None] | None = None,
    publish_dead_letters: Callable[[list[DeadLetter]], None] | None = None,
    on_alerts: OnAlerts | None = None,
    dispatcher: Dispatcher | None = None,
    group_id: str = "",
    detect: DetectStep | None = None,
) -> Pipeline:
    """A pipeline configured from `settings`, writing to `store` (detection from the settings by default),
    waking `dispatcher` when a commit queued notifications."""
    if detect is None:
        detect = build_detection(settings, load_scoring_model(settings), load_training_indexes(settings))
    detect.observe_ratio = metrics.observe_score_ratio
    model = detect.detector.model
    metrics.set_model(model.version if model else None, model.trained_at if model else None)
    return Pipeline(
        store=store,
        tracker=SessionTracker(
            gap_seconds=settings.sessions.gap_seconds,
            max_duration_seconds=settings.sessions.max_duration_seconds,
            max_active=settings.sessions.max_active,
            allowed_lateness_seconds=settings.sessions.allowed_lateness_seconds,
        ),
        decoder=RecordDecoder(settings.ingest),
        detect=detect,
        policy=CommitPolicy(settings.commit.min_interval_seconds, settings.commit.min_records),
        metrics=metrics,
        commit_positions=commit_positions,
        publish_dead_letters=publish_dead_letters,
        on_alerts=on_alerts,
        on_notifications=dispatcher.wake if dispatcher is not None else None,
        group_id=group_id,
        keep_raw_bytes=settings.ingest.dead_letter_raw_bytes,
        seen_events_retention_seconds=settings.database.seen_events_retention_hours * 3600.0,
        max_clock_skew_seconds=settings.ingest.max_clock_skew_seconds,
    )


def replay(
    settings: Settings,
    paths: Sequence[str],
    progress: Progress | None = None,
    metrics: Metrics | None = None,
    on_alerts: OnAlerts | None = None,
    detect: DetectStep | None = None,
) -> PipelineStats:
    """Process JSON Lines files (or stdin, `-`) to the end, exactly as the daemon would process a topic,
    alert notifications included."""
    prepare_process()
    metrics = metrics or Metrics()
    with persisting(settings, metrics) as (store, dispatcher):
        pipeline = build_pipeline(
            settings, store, metrics, on_alerts=on_alerts, dispatcher=dispatcher, detect=detect
        )
        outage = StorageOutage(_storage_retry(settings), metrics)
        for batch in read_jsonl_batches(paths, settings.kafka.max_poll_records):
            while dispatcher is not None and dispatcher.backlogged:
                # A file can wait: no group membership to keep alive, unlike the daemon's consumer.
                time.sleep(BACKPRESSURE_POLL_SECONDS)
                metrics.backpressure_seconds.inc(BACKPRESSURE_POLL_SECONDS)
            outage.until_stored(partial(pipeline.submit, batch), pipeline, then=pipeline.resume)
            if progress is not None:
                progress(batch)
        outage.until_stored(pipeline.flush, pipeline)
    return pipeline.stats


def _storage_retry(settings: Settings) -> RetryPolicy:
    return RetryPolicy(settings.database.retry_initial_seconds, settings.database.retry_max_seconds)


class StorageOutage:
    """The pipeline's view of a database outage: when to try again (backoff), and what operators see (one
    log line when it starts, one when it ends, the `storage_available` gauge and error counters)."""

    def __init__(
        self, retry: RetryPolicy, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._retry = retry
        self._metrics = metrics
        self._clock = clock
        self._attempts = 0
        self._since = 0.0
        self._next_attempt = 0.0

    @property
    def active(self) -> bool:
        """True from a failure until the next success."""
        return self._attempts > 0

    def due(self) -> bool:
        """True when the backoff after the last failure has passed (always, outside an outage)."""
        return self._clock() >= self._next_attempt

    def failed(self, error: StorageUnavailable, pipeline: Pipeline) -> None:
        """Count a failed attempt and schedule the next one."""
        now = self._clock()
        if not self.active:
            self._since = now
            log.warning(
                "database unavailable (%s): consumption held, %d records not yet stored are kept and "
                "retried with backoff; offsets are not committed meanwhile",
                error,
                pipeline.uncommitted_records,
            )
        self._attempts += 1
        self._next_attempt = now + self._retry.delay(self._attempts)
        self._metrics.storage_available.set(0)
        self._metrics.storage_errors.labels(outcome="unavailable").inc()

    def succeeded(self) -> None:
        """End the outage, if there was one."""
        if self.active:
            log.info(
                "database available again after %.1f s and %d attempts: consumption resumed",
                self._clock() - self._since,
                self._attempts,
            )
            self._attempts = 0
            self._next_attempt = 0.0
            self._metrics.storage_available.set(1)

    def until_stored(
        self, attempt: Callable[[], None], pipeline: Pipeline, then: Callable[[], None] | None = None
    ) -> None:
        """Call `attempt`, then `then` (by default `attempt` again) until neither raises
        `StorageUnavailable`, sleeping the backoff in between: for a source that can simply wait, such as
        a file."""
        while True:
            try:
                attempt()
            except StorageUnavailable as error:
                self.failed(error, pipeline)
                attempt = then or attempt
                time.sleep(max(self._next_attempt - self._clock(), 0.0))
            except StorageFailed:
                self._metrics.storage_errors.labels(outcome="failed").inc()
                raise
            else:
                self.succeeded()
                return


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived inside `StopFlag.interruptible()`."""


class StopFlag:
    """Set by SIGTERM/SIGINT (or by code): the daemon finishes its batch, commits and returns."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._interruptible = False

    def set(self) -> None:
        """Ask the loop to stop after the current batch."""
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    @contextmanager
    def on_signals(self) -> Iterator[StopFlag]:
        """Within the block, SIGTERM and SIGINT set the flag instead of killing the process."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handle(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            self.set()
            if self._interruptible:
                self._interruptible = False
                log.info("received %s while connecting: exiting", name)
                raise Interrupted(name)
            log.info("received %s: finishing the batch, committing, exiting", name)

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Within the block, SIGTERM and SIGINT (under `on_signals`) also raise `Interrupted` at once, out of
        whatever blocks: for calls that wait without looking at the flag, such as kafka-python's clients
        connecting in their constructors. Raises `Interrupted` at the start when the flag is already set."""
        if self:
            raise Interrupted("stop requested")
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False


def run_daemon(
    settings: Settings,
    stop: StopFlag,
    *,
    topics: list[str] | None = None,
    group_id: str | None = None,
    idle_exit_seconds: float | None = None,
    metrics: Metrics | None = None,
    progress: Progress | None = None,
    on_alerts: OnAlerts | None = None,
) -> PipelineStats:
    """Consume, process and commit until `stop` is set (or, with `idle_exit_seconds`, the stream is idle).

    Serves metrics and delivers alert notifications meanwhile. On the way out the current batch is
    finished, everything pending is persisted and offsets committed.
    """
    prepare_process()
    metrics = metrics or Metrics()
    group = group_id or settings.kafka.group_id
    with ExitStack() as resources:
        store, dispatcher = resources.enter_context(persisting(settings, metrics))
        listen = settings.metrics.host_port
        if listen is not None:
            resources.callback(metrics.serve(*listen))
        pipeline: Pipeline | None = None

        def release() -> None:
            # Runs inside `poll` (on kafka-python 3, on its network thread): must not raise.
            if pipeline is None:
                return
            try:
                pipeline.release_all()
            except StorageError as error:
                dropped = pipeline.discard()
                log.warning(
                    "partitions revoked while the database is unavailable (%s): %d records not stored "
                    "are left to be read again from the last committed offsets",
                    error,
                    dropped,
                )

        def stored_positions() -> dict[tuple[str, int], int]:
            try:
                return store.checkpoints(group)
            except StorageError as error:
                log.warning("stored positions unreadable (%s): resuming from committed offsets", error)
                return {}

        try:
            # Connecting is bounded (`connect_timeout_seconds`), but a stop must not wait for it.
            with stop.interruptible():
                publisher = KafkaPublisher(settings.kafka) if settings.kafka.dead_letter_topic else None
                if publisher is not None:
                    resources.callback(publisher.close)
                source = KafkaSource(
                    settings.kafka,
                    on_revoke=release,
                    topics=topics,
                    group_id=group,
                    stored_positions=stored_positions,
                )
                resources.callback(source.close)
        except Interrupted:
            log.info("stopped before consuming anything")
            return PipelineStats()

        def commit_positions(positions: Mapping[tuple[str, int], int]) -> None:
            try:
                source.commit(positions)
            except KafkaError as error:
                # Already stored: the next owner of these partitions resumes from the stored positions.
                log.warning("offsets not committed to the broker: %s", error)
                metrics.offset_commit_failures.inc()

        pipeline = build_pipeline(
            settings,
            store,
            metrics,
            commit_positions=commit_positions,
            publish_dead_letters=_dead_letter_publisher(publisher, settings) if publisher else None,
            on_alerts=on_alerts,
            dispatcher=dispatcher,
            group_id=group,
        )
        log.info("consuming %s as group %s from %s", source.topics, group, settings.kafka.bootstrap_servers)
        outage = StorageOutage(_storage_retry(settings), metrics)
        _consume(source, pipeline, stop, dispatcher, outage, idle_exit_seconds, progress)
        try:
            pipeline.flush()
        except StorageError:
            log.error(
                "stopping with %d records not stored: they are read again at the next start",
                pipeline.uncommitted_records,
            )
            raise
    return pipeline.stats


def _consume(
    source: KafkaSource,
    pipeline: Pipeline,
    stop: StopFlag,
    dispatcher: Dispatcher | None,
    outage: StorageOutage,
    idle_exit_seconds: float | None,
    progress: Progress | None,
) -> None:
    """The consumer loop: poll, process, commit when due; hold consumption while the outbox is full or the
    database unavailable (polling on, to stay in the group, and retrying the database with backoff)."""
    metrics = pipeline.metrics
    last_record = time.monotonic()
    held = False
    lag_observed = float("-inf")
    while not stop:
        backlogged = dispatcher is not None and dispatcher.backlogged
        if backlogged != held and not outage.active:
            if backlogged:
                log.warning("more undelivered notifications than the outbox limit: consumption held")
            else:
                log.info("outbox back under its limit: consumption resumed")
        metrics.outbox_backpressure.set(1 if backlogged else 0)
        if (backlogged or outage.active) != held:
            held = not held
            source.hold(held)
        polled_at = time.monotonic()
        records = source.poll()
        if held:
            source.hold(True)  # partitions assigned by a rebalance meanwhile start unpaused
            metrics.backpressure_seconds.inc(time.monotonic() - polled_at)
        try:
            if outage.due():
                pipeline.submit(records)
                outage.succeeded()
            elif records:
                pipeline.hold(records)
        except StorageUnavailable as error:
            outage.failed(error, pipeline)
        except StorageFailed:
            metrics.storage_errors.labels(outcome="failed").inc()
            raise
        if polled_at - lag_observed >= LAG_INTERVAL_SECONDS:
            lag_observed = polled_at
            metrics.observe_lag(source.lag())
        if records or not source.assigned or held:
            # Joining the group (a restarted member waits out its predecessor's session) is not idleness,
            # and neither is waiting for the sinks or the database.
            last_record = time.monotonic()
            if records and progress is not None:
                progress(records)
        elif idle_exit_seconds is not None and time.monotonic() - last_record > idle_exit_seconds:
            log.info("no records for %.0f s: stopping", idle_exit_seconds)
            break


def _dead_letter_publisher(
    publisher: KafkaPublisher, settings: Settings
) -> Callable[[list[DeadLetter]], None]:
    topic = settings.kafka.dead_letter_topic
    assert topic is not None

    def publish(letters: list[DeadLetter]) -> None:
        for letter in letters:
            publisher.send_dead_letter(topic, letter)
        publisher.flush()

    return publish


def decoded_batches(settings: Settings, paths: Sequence[str]) -> Iterator[list[Query]]:
    """The queries of JSON Lines files, one list per read batch; undecodable records are skipped (counted
    nowhere: use `replay` to see them as dead letters)."""
    decoder = RecordDecoder(settings.ingest.for_datasets())
    for batch in read_jsonl_batches(paths, settings.kafka.max_poll_records):
        queries: list[Query] = []
        for record in batch:
            try:
                queries.extend(decoder.decode(record))
            except InvalidRecord:
                continue
        yield queries


def train(settings: Settings, paths: Sequence[str], target_fpr: float, out: Path) -> ScoringModel:
    """Fit the scoring model on baseline traffic and save it to `out` (a directory).

    Allow-listed clients are left out of the calibration: they are silenced anyway, and one known-benign
    outlier (a nightly job scoring the training set) would otherwise set a rule's threshold by itself.
    """
    prepare_process()
    tracker = FeatureTracker(QueryEmbedder(), load_training_indexes(settings), max_clients=10_000_000)
    allowed = {entry.client_id for entry in settings.detection.allowlist}
    model = fit_scoring_model(
        decoded_batches(settings, paths),
        tracker,
        load_rules(settings.detection.rules_path),
        target_fpr,
        excluded=allowed.__contains__,
    )
    model.save(out)
    return model


def client_key(line: bytes) -> bytes | None:
    """The Kafka key of a query-log record: its client id, so that a client's events share a partition."""
    try:
        record = orjson.loads(line)
        client_id = record["client"]["id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None  # still produced: the consumer dead-letters it with the precise reason
    return str(client_id).encode() if client_id is not None else None


def produce_file(settings: Settings, path: Path, topic: str, progress: Progress | None = None) -> int:
    """Publish every non-blank line of a JSON Lines file to `topic`, keyed by client id; return the count."""
    publisher = KafkaPublisher(settings.kafka)
    sent = 0
    try:
        for batch in read_jsonl_batches([str(path)], 5000):
            for record in batch:
                publisher.send(topic, record.value, client_key(record.value))
            publisher.flush()
            sent += len(batch)
            if progress is not None:
                progress(batch)
    finally:
        publisher.close()
    return sent
