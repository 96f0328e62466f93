"""Delivers the outbox to the sinks, beside the pipeline and never in its way.

One worker thread per sink drains that sink's queue in order. A delivery that fails for a transient reason
(receiver down, timeout, 5xx, 429) is retried with exponential backoff and jitter, for as long as it takes,
and holds the notifications behind it; one the receiver rejects as invalid is marked failed (see
`mia-detector alerts outbox`) so that it cannot block the queue. Every result is written to the outbox, so a
restarted daemon carries on where the last one stopped. A monitor thread publishes each sink's backlog as
metrics and tells the consumer loop when the outbox is over its limit (back-pressure).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.exc import SQLAlchemyError

from detector.alerts.sinks.base import DeliveryError, Sink
from detector.metrics import Metrics
from detector.storage.errors import describe
from detector.storage.outbox import OutboxStore, QueuedNotification, SinkBacklog

log = logging.getLogger(__name__)

# Rows read per round trip from a sink's queue.
_BATCH = 100


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: the n-th retry waits between half and all of
    min(`max_seconds`, `initial_seconds` * 2^(n-1)), or longer when the receiver asked (Retry-After)."""

    initial_seconds: float = 1.0
    max_seconds: float = 300.0

    def delay(
        self, attempts: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1 for the first)."""
        ceiling = min(self.max_seconds, self.initial_seconds * 2.0 ** min(attempts - 1, 60))
        # "Equal jitter": never less than half the backoff, so a receiver that is down is not hammered, and
        # spread over the other half, so many notifications held by one outage do not retry in lockstep.
        jittered = ceiling / 2 + (rng or random).uniform(0.0, ceiling / 2)
        return max(jittered, retry_after or 0.0)


class Dispatcher:
    """Drains the outbox into `sinks` from background threads (`start`, `wake`, `close`).

    `max_pending` undelivered notifications (all sinks together) make `backlogged` true.
    `poll_seconds` bounds how long a worker sleeps without being woken.
    """

    def __init__(
        self,
        outbox: OutboxStore,
        sinks: Sequence[Sink],
        metrics: Metrics,
        *,
        retry: RetryPolicy | None = None,
        max_pending: int = 10_000,
        poll_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._outbox = outbox
        self._sinks = list(sinks)
        self._metrics = metrics
        self._retry = retry or RetryPolicy()
        self._max_pending = max_pending
        self._poll = poll_seconds
        self._clock = clock
        self._stopping = threading.Event()
        self._wakes = {sink.name: threading.Event() for sink in self._sinks}
        self._threads: list[threading.Thread] = []
        self._pending = 0
        for sink in self._sinks:
            metrics.add_sink(sink.name)

    @property
    def sink_names(self) -> list[str]:
        """The names of the sinks delivered to, in configuration order."""
        return [sink.name for sink in self._sinks]

    @property
    def backlogged(self) -> bool:
        """True while more than `max_pending` notifications wait (as of the monitor's last look)."""
        return self._pending > self._max_pending

    def start(self) -> None:
        """Start a worker per sink and the backlog monitor."""
        for sink in self._sinks:
            self._spawn(f"deliver-{sink.name}", functools.partial(self._work, sink))
        self._spawn("outbox-monitor", self._monitor)

    def wake(self) -> None:
        """New notifications are in the outbox: workers look now instead of at their next poll."""
        for event in self._wakes.values():
            event.set()

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every sink's queue to empty; True if it did."""
        deadline = time.monotonic() + timeout
        while True:
            self.wake()
            try:
                pending = self._pending_of_sinks(self._outbox.backlog())
            except SQLAlchemyError as error:  # unreachable database: the rows wait there for the next start
                log.warning("outbox unreadable: %s", describe(error))
                return False
            if pending == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the threads (a delivery in flight finishes; what is left stays queued) and close the sinks."""
        self._stopping.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout)
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:  # closing one sink must not keep the others open
                log.exception("closing sink %s", sink.name)

    def deliver_due(self, sink: Sink) -> float:
        """Deliver `sink`'s due notifications in order until its queue is empty or its head must wait;
        return how long to wait before the next look (seconds)."""
        while not self._stopping.is_set():
            queue = self._outbox.head(sink.name, _BATCH)
            if not queue:
                return self._poll
            for queued in queue:
                wait = queued.next_attempt_at.timestamp() - self._clock()
                if wait > 0:
                    return min(wait, self._poll)
                if self._stopping.is_set():
                    return 0.0
                if not self._deliver(sink, queued):
                    return self._poll
        return 0.0

    # -- internals ---------------------------------------------------------------------------------------

    def _deliver(self, sink: Sink, queued: QueuedNotification) -> bool:
        """One attempt; False when the queue must wait (a transient failure)."""
        attempts = queued.attempts + 1
        notification = queued.notification
        started = time.perf_counter()
        try:
            sink.deliver(notification)
        except DeliveryError as exc:
            error, permanent, retry_after = str(exc), exc.permanent, exc.retry_after
        except Exception as exc:  # a sink's bug must not stop delivery to the others
            log.exception("sink %s failed on notification %s", sink.name, notification.idempotency_key)
            error, permanent, retry_after = f"{sink.name}: {type(exc).__name__}: {exc}", False, None
        else:
            self._outbox.mark_delivered(queued.id)
            self._metrics.notifications.labels(sink=sink.name, outcome="delivered").inc()
            self._metrics.notification_delivery_seconds.labels(sink=sink.name).observe(
                time.perf_counter() - started
            )
            log.info("%s: delivered %s of alert %d", sink.name, notification.event, notification.alert.id)
            return True
        if permanent:
            self._outbox.mark_failed(queued.id, attempts, error)
            self._metrics.notifications.labels(sink=sink.name, outcome="failed").inc()
            log.error(
                "%s rejected %s of alert %d: %s", sink.name, notification.event, notification.alert.id, error
            )
            return True
        delay = self._retry.delay(attempts, retry_after)
        next_attempt = datetime.fromtimestamp(self._clock() + delay, UTC)
        self._outbox.mark_retry(queued.id, attempts, next_attempt, error)
        self._metrics.notifications.labels(sink=sink.name, outcome="retried").inc()
        log.warning("%s: attempt %d failed (%s); retrying in %.1f s", sink.name, attempts, error, delay)
        return False

    def _work(self, sink: Sink) -> None:
        wake = self._wakes[sink.name]
        unavailable = False
        while not self._stopping.is_set():
            try:
                wait = self.deliver_due(sink)
            except SQLAlchemyError as error:  # the database is unreachable: keep trying, the rows are safe
                if not unavailable:
                    log.warning(
                        "delivering to %s: outbox unavailable (%s); retrying", sink.name, describe(error)
                    )
                unavailable, wait = True, self._poll
            except Exception:
                log.exception("delivering to %s", sink.name)
                wait = self._poll
            else:
                if unavailable:
                    log.info("delivering to %s: outbox available again", sink.name)
                unavailable = False
            wake.wait(wait)
            wake.clear()

    def _monitor(self) -> None:
        while not self._stopping.is_set():
            try:
                self._publish_backlog()
            except SQLAlchemyError as error:  # reported by the workers and the pipeline
                log.debug("reading the outbox backlog: %s", describe(error))
            except Exception:
                log.exception("reading the outbox backlog")
            self._stopping.wait(self._poll)

    def _publish_backlog(self) -> None:
        backlog = self._outbox.backlog()
        now = self._clock()
        for name in self._wakes:
            sink_backlog = backlog.get(name)
            pending = sink_backlog.pending if sink_backlog else 0
            oldest = sink_backlog.oldest if sink_backlog else None
            self._metrics.notifications_pending.labels(sink=name).set(pending)
            age = now - oldest.timestamp() if oldest is not None else 0.0
            self._metrics.notification_oldest_pending.labels(sink=name).set(max(0.0, age))
        self._pending = self._pending_of_sinks(backlog)

    def _pending_of_sinks(self, backlog: dict[str, SinkBacklog]) -> int:
        # The outbox may hold rows of sinks no longer configured: they are not this dispatcher's backlog.
        return sum(entry.pending for name, entry in backlog.items() if name in self._wakes)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
