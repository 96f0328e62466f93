"""The daemon's scheduled retention: what is past retention deleted every interval, on a thread of its own
with its own database connection, never inside the pipeline's transaction."""

from __future__ import annotations

import logging
import threading

from detector.metrics import Metrics
from detector.storage import Purge, Retention, RetentionPolicy, StorageError

log = logging.getLogger(__name__)

# The first run waits this long at most after start: the consumer joins its group and catches up first, and
# a daemon restarted more often than the interval still deletes.
FIRST_RUN_SECONDS = 60.0


class ScheduledRetention:
    """Runs `retention.apply(policy)` every `interval_seconds` (the first time after at most
    `first_run_seconds`) until closed.

    A failed run, the database's fault or not, is logged and counted (`mia_detector_retention_runs_total`)
    and never reaches the daemon: the next run tries again.
    """

    def __init__(
        self,
        retention: Retention,
        policy: RetentionPolicy,
        interval_seconds: float,
        metrics: Metrics,
        *,
        first_run_seconds: float = FIRST_RUN_SECONDS,
    ) -> None:
        self._retention = retention
        self._policy = policy
        self._interval = interval_seconds
        self._first_run = min(first_run_seconds, interval_seconds)
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)

    def start(self) -> None:
        """Start the schedule."""
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the schedule; a run in progress stops after the chunk it is deleting."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def run_once(self) -> list[Purge] | None:
        """One run: the purges made, or None when it failed."""
        try:
            purges = self._retention.apply(self._policy, self._stop)
        except StorageError as error:
            log.warning("retention run failed (%s): tried again in %.0f s", error, self._interval)
            self._metrics.retention_runs.labels(outcome="failed").inc()
            return None
        except Exception as error:  # anything else must not end the schedule either
            log.error("retention run failed: %s: %s", type(error).__name__, error)
            self._metrics.retention_runs.labels(outcome="failed").inc()
            return None
        for purge in purges:
            self._metrics.retention_deleted.labels(table=purge.table).inc(purge.deleted)
        self._metrics.retention_runs.labels(outcome="completed").inc()
        deleted = ", ".join(f"{purge.deleted} {purge.table}" for purge in purges if purge.deleted)
        if deleted:
            log.info("retention: deleted %s", deleted)
        return purges

    def _loop(self) -> None:
        delay = self._first_run
        while not self._stop.wait(delay):
            self.run_once()
            delay = self._interval
