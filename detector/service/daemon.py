"""`run`: the daemon. Consumes a Kafka topic in a consumer group until stopped, serving metrics,
delivering alert notifications, deleting what is past retention and checking itself with detection canaries
meanwhile."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from contextlib import ExitStack

from kafka.errors import KafkaError

from detector.alerts.dispatcher import RetryPolicy
from detector.ingest.kafka import DeadLetterTopic, KafkaSource
from detector.kafka import KafkaPublisher
from detector.metrics import Metrics
from detector.pipeline import AlertListener, Outputs, Pipeline, PipelineStats
from detector.service.canary import start_canaries
from detector.service.consume import Pressure, Progress, consume
from detector.service.process import prepare_process
from detector.service.retention import ScheduledRetention
from detector.service.stop import Interrupted, StopFlag
from detector.service.wiring import (
    build_detection,
    build_pipeline,
    load_scoring_model,
    load_training_indexes,
    persisting,
    serve_metrics,
    serve_risk,
)
from detector.settings import Settings
from detector.storage import Fenced, Retention, RetentionPolicy, StorageError, Store

log = logging.getLogger(__name__)


class BrokerPositions:
    """Commits positions to the broker after the database has them: a failure is logged and counted, not
    raised, since the stored checkpoints are authoritative (`KafkaSource` resumes from them)."""

    def __init__(self, source: KafkaSource, metrics: Metrics) -> None:
        self._source = source
        self._metrics = metrics

    def commit(self, positions: Mapping[tuple[str, int], int]) -> None:
        """Commit `positions` to the broker, or say why it did not take them."""
        try:
            self._source.commit(positions)
        except KafkaError as error:
            log.warning("offsets not committed to the broker: %s", error)
            self._metrics.offset_commit_failures.inc()


class Rebalances:
    """What the daemon does when the group moves partitions: make pending work durable before they go (or,
    with the database down, drop it: it is read again from the last committed positions), and claim the
    partitions assigned (fencing out their previous owner) and resume them where the database says. Called
    inside `poll`; never raises."""

    def __init__(self, store: Store, group_id: str) -> None:
        self._store = store
        self._group_id = group_id
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._pipeline: Pipeline | None = None
        self._epochs: dict[tuple[str, int], int] = {}  # claimed before the pipeline was attached

    def attach(self, pipeline: Pipeline) -> None:
        """Hand partition changes to `pipeline` from now on (the source exists before the pipeline)."""
        self._pipeline = pipeline
        pipeline.claimed(self._epochs)

    def revoked(self) -> None:
        """Partitions are about to be taken away."""
        if self._pipeline is None:
            return
        try:
            self._pipeline.release_all()
        except Fenced as error:
            log.warning("commit refused: %s", error)
        except StorageError as error:
            dropped = self._pipeline.discard()
            log.warning(
                "partitions revoked while the database is unavailable (%s): %d records not stored are left "
                "to be read again from the last committed offsets",
                error,
                dropped,
            )

    def claim(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int] | None:
        """Claim `partitions` for this member and return their stored positions, by (topic, partition);
        None when the database is unavailable (the source asks again later)."""
        try:
            claim = self._store.claim_partitions(self._group_id, partitions, self._owner)
        except StorageError as error:
            log.warning("partitions not claimed (%s): they are held until the database answers", error)
            return None
        if self._pipeline is None:
            self._epochs |= claim.epochs
        else:
            self._pipeline.claimed(claim.epochs)
        return claim.positions


def run_daemon(
    settings: Settings,
    stop: StopFlag,
    *,
    topics: list[str] | None = None,
    group_id: str | None = None,
    idle_exit_seconds: float | None = None,
    metrics: Metrics | None = None,
    progress: Progress | None = None,
    alerts: AlertListener | None = None,
) -> PipelineStats:
    """Consume, process and commit until `stop` is set (or, with `idle_exit_seconds`, the stream is idle
    and nothing is left to the group: see `consume`).

    Serves metrics, delivers alert notifications, deletes what is past retention (every
    `retention.interval_seconds`) and injects detection canaries (every `canary.interval_seconds`)
    meanwhile. On the way out the current batch is
    finished, everything pending is persisted and offsets committed; when the database cannot take it,
    raises `StorageError` with nothing committed (the records are read again at the next start).
    """
    prepare_process()
    metrics = metrics or Metrics()
    group = group_id or settings.kafka.group_id
    # The model and the indexes first (each checked against its hashes): a refused file stops the daemon
    # before it joins the consumer group, where it would cost every member two rebalances.
    detect = build_detection(settings, load_scoring_model(settings), load_training_indexes(settings))
    with ExitStack() as resources:
        store, dispatcher = resources.enter_context(persisting(settings, metrics))
        if settings.metrics.host_port is not None:
            resources.callback(serve_metrics(metrics, settings.metrics))
        if settings.risk.host_port is not None or settings.risk.topic:
            resources.callback(serve_risk(settings, store.engine, metrics))
        if settings.retention.interval_seconds is not None:
            retention = ScheduledRetention(
                Retention(store.engine),
                RetentionPolicy.from_settings(settings),
                settings.retention.interval_seconds,
                metrics,
            )
            retention.start()
            resources.callback(retention.close)
        rebalances = Rebalances(store, group)
        try:
            # Connecting is bounded (`connect_timeout_seconds`), but a stop must not wait for it.
            with stop.interruptible():
                dead_letters = None
                if settings.kafka.dead_letter_topic:
                    publisher = KafkaPublisher(settings.kafka)
                    resources.callback(publisher.close)
                    dead_letters = DeadLetterTopic(publisher, settings.kafka.dead_letter_topic)
                source = KafkaSource(
                    settings.kafka,
                    on_revoke=rebalances.revoked,
                    topics=topics,
                    group_id=group,
                    claim=rebalances.claim,
                    metrics=metrics,
                )
                resources.callback(source.close)
                if settings.canary.interval_seconds is not None:
                    resources.callback(start_canaries(settings, source.topics[0], store, metrics, dispatcher))
        except Interrupted:
            log.info("stopped before consuming anything")
            return PipelineStats()
        outputs = Outputs(BrokerPositions(source, metrics), dead_letters, alerts, dispatcher)
        pipeline = build_pipeline(settings, store, metrics, outputs=outputs, group_id=group, detect=detect)
        rebalances.attach(pipeline)
        log.info("consuming %s as group %s from %s", source.topics, group, settings.kafka.bootstrap_servers)
        retry = RetryPolicy(settings.database.retry_initial_seconds, settings.database.retry_max_seconds)
        consume(
            source,
            pipeline,
            Pressure(retry, metrics),
            stop,
            idle_exit_seconds=idle_exit_seconds,
            progress=progress,
            rejoin=source.rejoin,
        )
        try:
            pipeline.flush()
        except Fenced as error:
            log.warning("commit refused: %s", error)
        except StorageError:
            log.error(
                "stopping with %d records not stored: they are read again at the next start",
                pipeline.uncommitted_records,
            )
            raise
    return pipeline.stats
