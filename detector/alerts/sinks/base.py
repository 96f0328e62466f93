"""The contract every sink meets, and the HTTP call most of them share."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx

from detector.domain import Notification
from detector.http import retry_after_seconds
from detector.text import json_line, shorten

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Statuses that say "try again later"; every other 4xx says the request itself is wrong.
_TRANSIENT_STATUSES = frozenset({408, 425, 429})
# How much of a receiver's error body goes into the recorded error.
_ERROR_BODY_CHARS = 200
# The longest string of a JSON payload. Nothing an alert holds comes near it (names have at most 256
# characters, dedup keys 1024): it bounds what a receiver gets whatever the alert holds.
MAX_STRING_CHARS = 4096


class DeliveryError(Exception):
    """A notification was not delivered. `permanent`: retrying the same request cannot succeed (the receiver
    rejected it as invalid); otherwise it is retried later, after `retry_after` seconds when the receiver
    said so."""

    def __init__(self, message: str, *, permanent: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


class Sink(Protocol):
    """A receiver of notifications. `deliver` returns once the receiver has accepted the notification and
    raises `DeliveryError` otherwise; it may be called again with the same notification (a retry)."""

    name: str

    def deliver(self, notification: Notification) -> None:
        """Hand `notification` to the receiver; raise `DeliveryError` unless it accepted it."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


def post_json(
    client: httpx.Client, url: str, body: Any, *, sink: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST `body` as JSON to `url`; return the response if its status is 2xx, else raise `DeliveryError`.

    `body` is sent as it is when it is bytes, else as `detector.text.json_line` writes it: with every
    character printable, so no receiver's log of the request has a line broken or a terminal code in it.
    Connection failures, timeouts, 408/425/429 and 5xx are transient; other statuses are permanent. The
    error names `sink`, never `url`, which may hold a secret (Slack webhook URLs do).
    """
    content = body if isinstance(body, bytes) else json_line(body).encode()
    try:
        response = client.post(
            url, content=content, headers={"Content-Type": "application/json", **(headers or {})}
        )
    except httpx.HTTPError as exc:
        raise DeliveryError(f"{sink}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if response.is_success:
        return response
    status = response.status_code
    detail = " ".join(response.text[:_ERROR_BODY_CHARS].split())
    transient = status >= 500 or status in _TRANSIENT_STATUSES
    raise DeliveryError(
        f"{sink}: HTTP {status} {detail}".rstrip(),
        permanent=not transient,
        retry_after=retry_after_seconds(response.headers.get("Retry-After")),
    )


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch, exactly (no float rounding); naive times are UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def bounded(value: Any, limit: int = MAX_STRING_CHARS) -> Any:
    """`value`, JSON-ready (dicts, lists, strings, numbers, None), with every string (keys included) longer
    than `limit` cut to `limit` characters, the last of them `…`."""
    if isinstance(value, str):
        return shorten(value, limit)
    if isinstance(value, dict):
        return {shorten(str(key), limit): bounded(item, limit) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [bounded(item, limit) for item in value]
    return value
