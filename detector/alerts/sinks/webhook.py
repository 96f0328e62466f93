"""A generic webhook: the notification itself as JSON (schema in `schemas/`), signed when a secret is set.

Strings are as the alert holds them, each cut to at most `MAX_STRING_CHARS` characters (a bound that nothing
read from a valid record comes near), in JSON whose every character is printable (`detector.text.json_line`).

Each request carries:

- `Idempotency-Key`: the same on every retry of one notification; drop a request whose key you already took.
- `X-MIA-Event`: `opened`, `updated`, `escalated`, `acknowledged`, `resolved`, `test`, `canary_missed` or
  `canary_recovered`.
- `X-MIA-Timestamp`: when the request was signed, in Unix seconds.
- `X-MIA-Signature` (with a secret): `sha256=` and the hex HMAC-SHA256, keyed with the secret, of the
  timestamp, a dot and the raw body. Covering the timestamp lets a receiver refuse replayed requests.

To verify, on the raw body bytes as received (before any JSON parsing)::

    import hashlib, hmac, time

    def verify(secret: str, body: bytes, timestamp: str, signature: str, tolerance: float = 300) -> bool:
        signed = timestamp.encode() + b"." + body
        expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        fresh = abs(time.time() - int(timestamp)) <= tolerance
        return fresh and hmac.compare_digest(expected, signature)

A retry is signed again with a new timestamp, so the signature differs between attempts while the
idempotency key and the body do not.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

import httpx

from detector.alerts.sinks.base import bounded, post_json
from detector.domain import Notification
from detector.text import json_line

SIGNATURE_HEADER = "X-MIA-Signature"
TIMESTAMP_HEADER = "X-MIA-Timestamp"
EVENT_HEADER = "X-MIA-Event"
IDEMPOTENCY_HEADER = "Idempotency-Key"

# Headers the sink sets itself: a configured header of the same name (in any case) is dropped.
_OWN_HEADERS = frozenset(
    name.lower() for name in (SIGNATURE_HEADER, TIMESTAMP_HEADER, EVENT_HEADER, IDEMPOTENCY_HEADER)
) | {"content-type"}


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-MIA-Signature` value: `sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class WebhookSink:
    """POSTs each notification as JSON to `url`, with configured `headers` (for authentication, say) and
    an HMAC signature when `secret` is set. `clock` returns the current Unix time."""

    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if secret == "":
            raise ValueError("the webhook secret is empty; leave it unset to send unsigned requests")
        self._url = url
        self._secret = secret
        self._headers = {
            name: value for name, value in (headers or {}).items() if name.lower() not in _OWN_HEADERS
        }
        self._clock = clock
        self._client = httpx.Client(timeout=timeout)

    def deliver(self, notification: Notification) -> None:
        """POST `notification`; raise `DeliveryError` unless the receiver answered 2xx."""
        body = json_line(bounded(notification.model_dump(mode="json"))).encode()
        post_json(self._client, self._url, body, sink=self.name, headers=self.headers(notification, body))

    def headers(self, notification: Notification, body: bytes) -> dict[str, str]:
        """The headers sent with `body`: the configured ones, then ours (which win)."""
        timestamp = str(int(self._clock()))
        headers = {
            **self._headers,
            IDEMPOTENCY_HEADER: notification.idempotency_key,
            EVENT_HEADER: notification.event.value,
            TIMESTAMP_HEADER: timestamp,
        }
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, timestamp, body)
        return headers

    def close(self) -> None:
        """Close the connection pool; safe to call more than once."""
        self._client.close()
