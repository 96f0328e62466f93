"""End to end: the daemon consumes attack traffic from the broker while a receiver is down for 30 s and
another fails its first calls. Counted at the receivers: no notification lost, none duplicated, and
consumption never waited for delivery."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from pathlib import Path

import orjson
import pytest

from detector.broker import EmbeddedBroker
from detector.domain import RawRecord
from detector.ingest.jsonl import read_jsonl_batches
from detector.kafka import KafkaPublisher
from detector.service import StopFlag, client_key, run_daemon
from detector.settings import Settings
from detector.simulate import simulate
from detector.storage import DeliveryStatus, OutboxStore, open_engine
from tests.receivers import RecordedRequest, RecordingReceiver
from tests.support import make_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SECRET = "outage-test-secret"
OUTAGE_SECONDS = 30.0
STREAM_SECONDS = 40.0


def signed_by_us(request: RecordedRequest) -> str | None:
    """The webhook's signature must verify with the shared secret."""
    timestamp = request.headers.get("x-mia-timestamp", "")
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + request.body, hashlib.sha256).hexdigest()
    if request.headers.get("x-mia-signature") != f"sha256={expected}":
        return "bad signature"
    return None


def produce_slowly(settings: Settings, events: Path, seconds: float, stop: threading.Event) -> int:
    """Publish the file's records spread over `seconds`, as live traffic arrives; return how many."""
    records = [record for batch in read_jsonl_batches([str(events)], 10_000) for record in batch]
    publisher = KafkaPublisher(settings.kafka)
    slices = 40
    per_slice = -(-len(records) // slices)
    try:
        for start in range(0, len(records), per_slice):
            if stop.is_set():
                break
            for record in records[start : start + per_slice]:
                publisher.send(settings.kafka.topics[0], record.value, client_key(record.value))
            publisher.flush()
            time.sleep(seconds / slices)
    finally:
        publisher.close()
    return len(records)


def test_a_30_second_outage_loses_and_duplicates_no_notification(
    broker: EmbeddedBroker, sqlite_url: str, tmp_path: Path
) -> None:
    scenario = simulate("smoke", 5, tmp_path / "smoke")
    with (
        RecordingReceiver(validate=signed_by_us) as webhook,
        RecordingReceiver(status=202, body={"status": "success"}, fail_first=5) as pagerduty,
    ):
        settings = make_settings(
            sqlite_url,
            broker,
            webhook={"url": f"{webhook.url}/hook", "secret": SECRET},
            pagerduty={"routing_key": "R" * 32, "url": f"{pagerduty.url}/v2/enqueue"},
            # Updates notify every 2 s of wall time, so that many notifications fall into the outage.
            alerts={"renotify_seconds": 2.0, "retry_initial_seconds": 0.5, "retry_max_seconds": 2.0},
        )
        consumed_at: list[tuple[float, int]] = []

        def progress(records: list[RawRecord]) -> None:
            consumed_at.append((time.monotonic(), len(records)))

        stop, stop_producing = StopFlag(), threading.Event()
        daemon = threading.Thread(target=lambda: run_daemon(settings, stop, progress=progress), daemon=True)
        daemon.start()
        producer_done = threading.Event()
        produced: list[int] = []

        def producer() -> None:
            produced.append(
                produce_slowly(settings, scenario.out / "events.jsonl", STREAM_SECONDS, stop_producing)
            )
            producer_done.set()

        threading.Thread(target=producer, daemon=True).start()
        try:
            time.sleep(3.0)
            webhook.stop()
            outage_start, down_since = time.monotonic(), time.time()
            time.sleep(OUTAGE_SECONDS)
            webhook.start()
            outage_end, back_at = time.monotonic(), time.time()
            assert producer_done.wait(60)
            outbox = OutboxStore(open_engine(settings, migrate=False))
            deadline = time.monotonic() + 60
            while outbox.backlog() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert outbox.backlog() == {}, "notifications still pending a minute after the outage"
        finally:
            stop_producing.set()
            stop.set()
            daemon.join(60)
        assert not daemon.is_alive()

    queued = outbox.list(limit=100_000)
    assert {entry.status for entry in queued} == {DeliveryStatus.DELIVERED}
    by_sink = {sink: [e for e in queued if e.sink == sink] for sink in ("webhook", "pagerduty")}
    assert len(by_sink["webhook"]) == len(by_sink["pagerduty"]) >= 10

    # The webhook: every queued notification arrived exactly once, in the order queued.
    webhook_keys = [request.headers["idempotency-key"] for request in webhook.accepted]
    assert webhook.rejected == []
    assert webhook_keys == [e.notification.idempotency_key for e in reversed(by_sink["webhook"])]
    # Many were queued while the webhook was down, and were delivered once it was back.
    held = [e for e in by_sink["webhook"] if down_since < e.created_at.timestamp() < back_at]
    assert len(held) >= 5
    assert all(e.delivered_at is not None and e.delivered_at.timestamp() >= back_at for e in held)
    assert max(e.attempts for e in held) > 1

    # PagerDuty: 5 refusals, then each notification once (its dedup key groups them into incidents).
    pagerduty_keys = [
        orjson.loads(request.body)["payload"]["custom_details"]["idempotency_key"]
        for request in pagerduty.accepted
        if orjson.loads(request.body)["event_action"] == "trigger"
    ]
    assert len(pagerduty.requests) == len(by_sink["pagerduty"]) + 5
    assert len(pagerduty.accepted) == len(by_sink["pagerduty"])
    assert len(set(pagerduty_keys)) == len(pagerduty_keys)

    # Consumption went on during the outage: records were processed while the webhook was down.
    during = sum(count for at, count in consumed_at if outage_start + 1 < at < outage_end - 1)
    assert during > 0 and sum(count for _, count in consumed_at) == produced[0] == scenario.records
