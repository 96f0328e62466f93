"""The daemon's detection canaries (docs/canaries.md): every interval one canary attack is published to the
daemon's own input topic, keyed by its client as produced records are, and the monitor settles the canaries
it watches; both on a thread of their own, beside the consumer loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kafka.errors import KafkaError

from detector.alerts.canary import CanaryMonitor
from detector.alerts.dispatcher import Dispatcher
from detector.domain import CANARY_MODEL, Canary, CanaryClients
from detector.kafka import KafkaPublisher
from detector.metrics import Metrics
from detector.settings import Settings
from detector.simulate.canary import CANARY_KIND, canary_records
from detector.storage import Store

log = logging.getLogger(__name__)

# Marks a canary's records for the topic's other consumers (feature stores, billing, audit), which may
# want to skip them; the detector itself knows a canary by its client id (`detector.domain.canary`).
CANARY_HEADER = ("mia-canary", b"1")
# How often the monitor looks for the alerts of the canaries it watches.
CHECK_SECONDS = 1.0


class ScheduledCanaries:
    """Injects a canary into `topic` every `interval_seconds` (the first one interval after `start`) and
    has `monitor` check every `check_seconds`, until closed.

    A canary that cannot be published is watched all the same: it is missed, as detection that cannot read
    its own topic is blind. Nothing that goes wrong here reaches the daemon.
    """

    def __init__(
        self,
        publisher: KafkaPublisher,
        topic: str,
        clients: CanaryClients,
        monitor: CanaryMonitor,
        interval_seconds: float,
        *,
        check_seconds: float = CHECK_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._publisher = publisher
        self._topic = topic
        self._clients = clients
        self._monitor = monitor
        self._interval = interval_seconds
        self._check = check_seconds
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="canaries", daemon=True)

    def start(self) -> ScheduledCanaries:
        """Start the schedule; returns this schedule."""
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the schedule (canaries still watched are not settled)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def inject(self) -> Canary:
        """Publish one canary attack, event time now, and have the monitor watch it."""
        client_id = self._clients.mint()
        injected_at = self._clock()
        records = canary_records(client_id, CANARY_MODEL, injected_at)
        canary = Canary(client_id, CANARY_KIND, injected_at, len(records))
        try:
            for value in records:
                self._publisher.send(self._topic, value, client_id.encode(), [CANARY_HEADER])
            self._publisher.flush()
        except KafkaError as error:
            log.warning("canary %s not published (%s): it will be missed", client_id, error)
        self._monitor.watch(canary)
        return canary

    def _loop(self) -> None:
        due = self._clock() + self._interval
        while not self._stop.wait(min(self._check, max(0.0, due - self._clock()))):
            try:
                if self._clock() >= due:
                    due = self._clock() + self._interval
                    self.inject()
                self._monitor.check()
            except Exception:  # the schedule goes on: the next canary tries again
                log.exception("detection canaries")


def start_canaries(
    settings: Settings, topic: str, store: Store, metrics: Metrics, dispatcher: Dispatcher | None
) -> Callable[[], None]:
    """The canaries of `settings.canary`, started on `topic`, settled against `store` and raising
    `canary_missed` (and `canary_recovered` after it) through `dispatcher`'s sinks; returns the function
    that stops them. Raises `KafkaUnreachable` when the brokers do not answer (and `ValueError` when
    canaries are off)."""
    canary = settings.canary
    clients = canary.clients()
    if canary.interval_seconds is None or clients is None:
        raise ValueError("canaries are turned off (MIA_CANARY_INTERVAL_SECONDS is unset)")
    publisher = KafkaPublisher(settings.kafka)
    monitor = CanaryMonitor(
        store,
        metrics,
        canary.deadline_seconds,
        sinks=dispatcher.sink_names if dispatcher is not None else (),
        wake=dispatcher.wake if dispatcher is not None else None,
    )
    schedule = ScheduledCanaries(publisher, topic, clients, monitor, canary.interval_seconds).start()
    log.info(
        "a detection canary every %g s on %s, its alert due within %g s",
        canary.interval_seconds,
        topic,
        canary.deadline_seconds,
    )

    def stop() -> None:
        schedule.close()
        publisher.close()

    return stop
