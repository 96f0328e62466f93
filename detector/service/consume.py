"""The consumer loop, whatever the source: poll, submit to the pipeline, commit when due; under back-pressure
hold the source (which keeps polling, so a consumer stays in its group) and offer the held records again."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from detector.alerts.dispatcher import RetryPolicy
from detector.domain import Backpressure, RawRecord
from detector.ingest.source import Source
from detector.metrics import Metrics
from detector.pipeline import OutboxFull, Pipeline
from detector.service.stop import StopFlag
from detector.storage import Fenced, StorageFailed, StorageUnavailable

log = logging.getLogger(__name__)

Progress = Callable[[list[RawRecord]], None]

# How often the consumer loop exports its lag (read from the last fetch: no broker round trip).
LAG_INTERVAL_SECONDS = 1.0


class Pressure:
    """Back-pressure as the loop lives it: when to offer the held records again, and what operators see
    (one log line as it starts and one as it ends; `storage_available`, `outbox_backpressure`, the error
    counters and `backpressure_seconds_total`).

    A database outage is retried with `retry`'s backoff; a full outbox after the interval it asks for.
    """

    def __init__(
        self, retry: RetryPolicy, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._retry = retry
        self._metrics = metrics
        self._clock = clock
        self._cause: Backpressure | None = None
        self._attempts = 0
        self._since = 0.0
        self._next_attempt = 0.0

    @property
    def active(self) -> bool:
        """True from the first refusal until the pipeline takes records again."""
        return self._cause is not None

    def due(self) -> bool:
        """True when the pipeline may be offered records (always, outside back-pressure)."""
        return self._clock() >= self._next_attempt

    def applied(self, cause: Backpressure, pipeline: Pipeline) -> None:
        """The pipeline refused with `cause`: count it and schedule the next attempt."""
        now = self._clock()
        if not self.active or type(cause) is not type(self._cause):
            self._since = now
            self._announce(cause, pipeline)
        self._cause = cause
        self._attempts += 1
        storage = isinstance(cause, StorageUnavailable)
        delay = self._retry.delay(self._attempts) if storage else (cause.retry_after or 0.5)
        self._next_attempt = now + delay
        if storage:
            self._metrics.storage_available.set(0)
            self._metrics.storage_errors.labels(outcome="unavailable").inc()
        else:
            self._metrics.outbox_backpressure.set(1)

    def relieved(self) -> None:
        """The pipeline took records again: end the back-pressure, if there was any."""
        if self._cause is None:
            return
        held = self._clock() - self._since
        self._metrics.backpressure_seconds.inc(held)
        if isinstance(self._cause, StorageUnavailable):
            log.info(
                "database available again after %.1f s and %d attempts: consumption resumed",
                held,
                self._attempts,
            )
            self._metrics.storage_available.set(1)
        else:
            log.info("outbox back under its limit after %.1f s: consumption resumed", held)
            self._metrics.outbox_backpressure.set(0)
        self._cause = None
        self._attempts = 0
        self._next_attempt = 0.0

    def wait_until_due(self) -> None:
        """Sleep until the next attempt is due (for a caller with nothing else to do meanwhile)."""
        time.sleep(max(self._next_attempt - self._clock(), 0.0))

    def _announce(self, cause: Backpressure, pipeline: Pipeline) -> None:
        if isinstance(cause, StorageUnavailable):
            log.warning(
                "database unavailable (%s): consumption held, %d records not yet stored are kept and retried "
                "with backoff; offsets are not committed meanwhile",
                cause,
                pipeline.uncommitted_records,
            )
        elif isinstance(cause, OutboxFull):
            log.warning("%s: consumption held until the sinks catch up", cause)
        else:
            log.warning("back-pressure (%s): consumption held", cause)


def consume(
    source: Source,
    pipeline: Pipeline,
    pressure: Pressure,
    stop: StopFlag,
    *,
    idle_exit_seconds: float | None = None,
    progress: Progress | None = None,
    rejoin: Callable[[], None] | None = None,
) -> None:
    """Feed `pipeline` from `source` until `stop` is set, the source is exhausted, or (with
    `idle_exit_seconds`) no record came for that long and none is left to read (`Source.left_to_read`: the
    partitions of a consumer group that other members hold, or that the group has not handed to this one
    yet, are drained first). What is pending is not committed here: the caller
    ends with `pipeline.flush()`. Raises `StorageFailed` when the database refuses the work for good.

    A commit refused because another member of the consumer group claimed a partition (`Fenced`: the
    pipeline has dropped what it held) calls `rejoin`, for the source to join its group again; without
    `rejoin` (a source with no group) it is raised."""
    metrics = pipeline.metrics
    last_record = time.monotonic()
    lag_observed = float("-inf")
    while not stop and not source.exhausted:
        polled_at = time.monotonic()
        records = source.poll()
        try:
            if pressure.due():
                pipeline.submit(records)
                pressure.relieved()
            else:
                pipeline.hold(records)
        except Backpressure as cause:
            pressure.applied(cause, pipeline)
        except StorageFailed:
            metrics.storage_errors.labels(outcome="failed").inc()
            raise
        except Fenced as error:
            if rejoin is None:
                raise
            log.warning("commit refused: %s", error)
            rejoin()
        # Partitions assigned by a rebalance start unpaused: hold again after every poll while pressed.
        source.hold(pressure.active)
        lag = source.lag()
        pipeline.lag(lag)
        if polled_at - lag_observed >= LAG_INTERVAL_SECONDS:
            lag_observed = polled_at
            metrics.observe_lag(lag)
        if records and progress is not None:
            progress(records)
        if records or not source.assigned or pressure.active:
            # Joining the group (a restarted member waits out its predecessor's session) is not idleness,
            # and neither is waiting for the sinks or the database.
            last_record = time.monotonic()
        elif idle_exit_seconds is not None and time.monotonic() - last_record > idle_exit_seconds:
            left = source.left_to_read()
            if left == {}:
                log.info("no records for %.0f s and none left to read: stopping", idle_exit_seconds)
                return
            # Partitions that another member holds, or that the group has not handed to this one yet (a
            # killed predecessor holds them until its session times out), are not drained: wait for them.
            if left:
                log.info(
                    "no records for %.0f s, but %d are left to the group on %s: waiting",
                    idle_exit_seconds,
                    sum(left.values()),
                    ", ".join(f"{topic}/{partition}" for topic, partition in sorted(left)),
                )
            last_record = time.monotonic()
