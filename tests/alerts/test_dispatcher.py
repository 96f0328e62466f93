"""The dispatcher drains the outbox into sinks: in order per sink, retrying with backoff, never losing a
notification, resuming after a restart. A scripted in-memory sink stands in for the receivers here (the
sinks themselves are tested against real receivers in `tests/alerts/sinks/`)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import Engine

from detector.alerts.dispatcher import Dispatcher, RetryPolicy
from detector.alerts.lifecycle import NotificationPolicy
from detector.alerts.sinks.base import DeliveryError
from detector.domain import AlertKind, Notification
from detector.metrics import Metrics
from detector.storage import DeliveryStatus, OutboxStore, Store, create_engine_for, upgrade
from tests.storage.conftest import Alerts
from tests.storage.test_alerts import detection
from tests.support import as_written


class ScriptedSink:
    """Accepts notifications, except that `failures` (a list of errors or None) are raised first."""

    def __init__(self, name: str = "webhook", failures: Sequence[Exception] | None = None) -> None:
        self.name = name
        self.failures = list(failures or [])
        self.received: list[Notification] = []
        self.attempts = 0
        self.closed = False
        self._lock = threading.Lock()

    def deliver(self, notification: Notification) -> None:
        with self._lock:
            self.attempts += 1
            if self.failures:
                raise self.failures.pop(0)
            self.received.append(notification)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'alerts.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def queue_alerts(engine: Engine, count: int, sinks: tuple[str, ...] = ("webhook",)) -> list[Notification]:
    """Open `count` alerts (one notification each, queued for `sinks`)."""
    alerts = Alerts(Store(engine), NotificationPolicy(sinks=sinks))
    return alerts.record([detection(f"client-{i:03d}") for i in range(count)]).notifications


def dispatcher_for(engine: Engine, *sinks: ScriptedSink, **options: object) -> Dispatcher:
    retry = RetryPolicy(initial_seconds=0.05, max_seconds=0.2)
    return Dispatcher(OutboxStore(engine), sinks, Metrics(), retry=retry, poll_seconds=0.05, **options)  # type: ignore[arg-type]


def drain(dispatcher: Dispatcher) -> None:
    """Run `dispatcher` until its queues are empty (at most 10 s), then stop it."""
    dispatcher.start()
    try:
        assert dispatcher.drain(timeout=10)
    finally:
        dispatcher.close()


def keys(notifications: list[Notification]) -> list[str]:
    return [notification.idempotency_key for notification in notifications]


def test_every_notification_is_delivered_once_in_order(engine: Engine) -> None:
    queued = queue_alerts(engine, 5, sinks=("webhook", "slack"))
    webhook, slack = ScriptedSink("webhook"), ScriptedSink("slack")
    dispatcher = dispatcher_for(engine, webhook, slack)
    drain(dispatcher)

    assert keys(webhook.received) == keys(slack.received) == keys(queued)
    statuses = {(q.sink, q.status) for q in OutboxStore(engine).list()}
    assert statuses == {("webhook", DeliveryStatus.DELIVERED), ("slack", DeliveryStatus.DELIVERED)}
    assert webhook.closed and slack.closed


def test_a_failing_receiver_holds_its_queue_in_order_and_gets_everything_once_back(engine: Engine) -> None:
    queued = queue_alerts(engine, 4, sinks=("webhook", "slack"))
    down = [DeliveryError("webhook: ConnectError") for _ in range(3)]
    webhook, slack = ScriptedSink("webhook", down), ScriptedSink("slack")
    metrics = Metrics()
    dispatcher = Dispatcher(
        OutboxStore(engine),
        [webhook, slack],
        metrics,
        retry=RetryPolicy(0.05, 0.2),
        poll_seconds=0.05,
    )
    drain(dispatcher)

    assert keys(webhook.received) == keys(slack.received) == keys(queued)
    assert webhook.attempts == 4 + 3
    sample = metrics.registry.get_sample_value
    assert sample("mia_detector_notifications_total", {"sink": "webhook", "outcome": "retried"}) == 3
    assert sample("mia_detector_notifications_total", {"sink": "webhook", "outcome": "delivered"}) == 4


def test_a_rejected_notification_is_marked_failed_and_does_not_block_the_rest(engine: Engine) -> None:
    queued = queue_alerts(engine, 3)
    sink = ScriptedSink(failures=[DeliveryError("webhook: HTTP 400 bad", permanent=True)])
    dispatcher = dispatcher_for(engine, sink)
    drain(dispatcher)

    assert keys(sink.received) == keys(queued)[1:]
    [failed] = OutboxStore(engine).list(status="failed")
    assert failed.notification == as_written(queued[0]) and failed.last_error == "webhook: HTTP 400 bad"


def test_a_bug_in_a_sink_is_retried_like_a_transient_failure(engine: Engine) -> None:
    queued = queue_alerts(engine, 1)
    sink = ScriptedSink(failures=[KeyError("oops")])
    dispatcher = dispatcher_for(engine, sink)
    drain(dispatcher)

    assert keys(sink.received) == keys(queued) and sink.attempts == 2


def test_a_restarted_dispatcher_resumes_where_the_last_one_stopped(engine: Engine) -> None:
    queued = queue_alerts(engine, 3)
    down = ScriptedSink(failures=[DeliveryError("webhook: ReadTimeout")] * 100)
    first = dispatcher_for(engine, down)
    first.start()
    time.sleep(0.3)
    first.close()
    assert down.received == [] and down.attempts >= 1
    [held, *_] = OutboxStore(engine).head("webhook", 10)
    assert held.attempts == down.attempts and held.last_error == "webhook: ReadTimeout"

    back = ScriptedSink()
    second = dispatcher_for(engine, back)
    drain(second)
    assert keys(back.received) == keys(queued)


def test_the_dispatcher_reports_backlog_over_its_limit(engine: Engine) -> None:
    queue_alerts(engine, 3)
    down = ScriptedSink(failures=[DeliveryError("webhook: down")] * 1000)
    metrics = Metrics()
    dispatcher = Dispatcher(
        OutboxStore(engine), [down], metrics, retry=RetryPolicy(1, 1), max_pending=2, poll_seconds=0.05
    )
    dispatcher.start()
    try:
        deadline = time.monotonic() + 5
        while not dispatcher.backlogged and time.monotonic() < deadline:
            time.sleep(0.02)
        assert dispatcher.backlogged
        assert (
            metrics.registry.get_sample_value("mia_detector_notifications_pending", {"sink": "webhook"}) == 3
        )
        assert not dispatcher.drain(timeout=0.2)
    finally:
        dispatcher.close()


def test_new_work_wakes_an_idle_dispatcher(engine: Engine) -> None:
    sink = ScriptedSink()
    dispatcher = Dispatcher(OutboxStore(engine), [sink], Metrics(), poll_seconds=60)
    dispatcher.start()
    try:
        time.sleep(0.2)  # the worker found nothing and sleeps for a minute unless woken
        queued = queue_alerts(engine, 1)
        dispatcher.wake()
        deadline = time.monotonic() + 5
        while not sink.received and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        dispatcher.close()
    assert keys(sink.received) == keys(queued)


def test_backoff_grows_exponentially_with_jitter_and_honours_retry_after() -> None:
    policy = RetryPolicy(initial_seconds=1.0, max_seconds=60.0)
    rng = random.Random(7)

    for attempts, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (500, 60.0)]:
        delays = [policy.delay(attempts, rng=rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert len(set(delays)) > 150  # spread out, not lockstep
    assert policy.delay(1, retry_after=30.0, rng=rng) == 30.0


def test_detections_of_a_coordinated_group_queue_one_notification(engine: Engine) -> None:
    alerts = Alerts(Store(engine), NotificationPolicy(sinks=("webhook",)))
    group = detection("b", "a", kind=AlertKind.COORDINATED_CLIENTS)
    [notification] = alerts.record([group, group]).notifications
    assert notification.alert.client_ids == ["a", "b"]
