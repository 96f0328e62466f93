"""The webhook sink against a receiver that verifies its signature as the module docstring tells users to."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time
from collections.abc import Callable, Iterator

import pytest

from detector.alerts.sinks.base import DeliveryError
from detector.alerts.sinks.webhook import WebhookSink
from detector.domain import Notification, NotificationEvent
from tests.receivers import RecordedRequest, RecordingReceiver
from tests.support import as_written, make_notification

SECRET = "whsec-4f1e2d"
PATH = "/hooks/s3cr3t"
TOLERANCE_SECONDS = 300


def verifier(secret: str) -> Callable[[RecordedRequest], str | None]:
    """A receiver's check: fresh timestamp, signature over timestamp and raw body, a notification body."""

    def verify(request: RecordedRequest) -> str | None:
        assert request.method == "POST" and request.path == PATH, (request.method, request.path)
        assert request.headers["content-type"] == "application/json"
        timestamp = request.headers.get("x-mia-timestamp", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
            return f"stale or missing timestamp {timestamp!r}"
        signed = timestamp.encode() + b"." + request.body
        expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("x-mia-signature", "")):
            return "signature mismatch"
        notification = Notification.model_validate_json(request.body)
        assert request.headers["x-mia-event"] == notification.event.value
        assert request.headers["idempotency-key"] == notification.idempotency_key
        return None

    return verify


def validate_unsigned(request: RecordedRequest) -> str | None:
    """The contract suite's check of an unsigned webhook: a notification with matching headers."""
    assert request.method == "POST" and request.path == PATH
    assert "x-mia-signature" not in request.headers
    notification = Notification.model_validate_json(request.body)
    assert request.headers["idempotency-key"] == notification.idempotency_key
    assert request.headers["x-mia-timestamp"].isdigit()
    return None


@pytest.fixture
def receiver() -> Iterator[RecordingReceiver]:
    with RecordingReceiver(validate=verifier(SECRET)) as running:
        yield running


@pytest.fixture
def sink(receiver: RecordingReceiver) -> Iterator[WebhookSink]:
    webhook = WebhookSink(receiver.url + PATH, secret=SECRET, timeout=2.0)
    yield webhook
    webhook.close()


@pytest.mark.parametrize("event", list(NotificationEvent))
def test_the_body_is_the_notification_signed(
    sink: WebhookSink, receiver: RecordingReceiver, event: NotificationEvent
) -> None:
    notification = make_notification(event)
    sink.deliver(notification)
    [request] = receiver.accepted
    assert request.body == notification.model_dump_json().encode()
    assert Notification.model_validate_json(request.body) == as_written(notification)
    assert request.headers["x-mia-event"] == event.value


def test_a_receiver_with_another_secret_rejects_it(receiver: RecordingReceiver) -> None:
    with RecordingReceiver(validate=verifier("not-" + SECRET)) as other:
        sink = WebhookSink(other.url + PATH, secret=SECRET, timeout=2.0)
        try:
            with pytest.raises(DeliveryError) as raised:
                sink.deliver(make_notification())
        finally:
            sink.close()
        assert raised.value.permanent and "signature mismatch" in str(raised.value)
        assert [request.error for request in other.requests] == ["signature mismatch"]


def test_the_signature_covers_the_timestamp(sink: WebhookSink, receiver: RecordingReceiver) -> None:
    sink.deliver(make_notification())
    [original] = receiver.accepted
    verify = verifier(SECRET)
    assert verify(original) is None
    # Replayed with a fresh timestamp, the signature no longer matches ...
    fresh = str(int(original.headers["x-mia-timestamp"]) + 1)
    forged = dataclasses.replace(original, headers={**original.headers, "x-mia-timestamp": fresh})
    assert verify(forged) == "signature mismatch"
    # ... and replayed as it was, an hour later, its timestamp is stale.
    an_hour_ago = time.time() - 3600
    old = WebhookSink(receiver.url + PATH, secret=SECRET, clock=lambda: an_hour_ago, timeout=2.0)
    try:
        with pytest.raises(DeliveryError, match="stale"):
            old.deliver(make_notification())
    finally:
        old.close()
    assert receiver.requests[-1].headers["x-mia-timestamp"] == str(int(an_hour_ago))


def test_a_retry_keeps_its_idempotency_key_and_body(receiver: RecordingReceiver) -> None:
    now = [time.time()]
    sink = WebhookSink(receiver.url + PATH, secret=SECRET, clock=lambda: now[0], timeout=2.0)
    try:
        notification = make_notification()
        sink.deliver(notification)
        now[0] += 5
        sink.deliver(notification)
        sink.deliver(make_notification(sequence=2))
    finally:
        sink.close()
    first, retry, second = receiver.accepted
    assert first.headers["idempotency-key"] == retry.headers["idempotency-key"] == "mia-7-1"
    assert second.headers["idempotency-key"] == "mia-7-2"
    assert first.body == retry.body
    # Signed afresh: the timestamp, and so the signature, moved on.
    assert first.headers["x-mia-signature"] != retry.headers["x-mia-signature"]


def test_configured_headers_are_sent_but_ours_win(receiver: RecordingReceiver) -> None:
    configured = {
        "Authorization": "Bearer token-1",
        "X-Team": "ml-security",
        "idempotency-key": "forged",
        "X-MIA-Signature": "sha256=forged",
        "content-type": "text/plain",
    }
    sink = WebhookSink(receiver.url + PATH, secret=SECRET, headers=configured, timeout=2.0)
    try:
        sink.deliver(make_notification())
    finally:
        sink.close()
    [request] = receiver.accepted  # the signature verified: ours was the one sent
    assert request.headers["authorization"] == "Bearer token-1"
    assert request.headers["x-team"] == "ml-security"
    assert request.headers["idempotency-key"] == "mia-7-1"
    assert request.headers["content-type"] == "application/json"


def test_without_a_secret_nothing_is_signed() -> None:
    with RecordingReceiver(validate=validate_unsigned) as receiver:
        sink = WebhookSink(receiver.url + PATH, timeout=2.0)
        try:
            sink.deliver(make_notification())
        finally:
            sink.close()
        assert len(receiver.accepted) == 1


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        WebhookSink("http://127.0.0.1:9/hook", secret="")
