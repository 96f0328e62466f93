"""Times as the detector writes them for people and receivers: RFC 3339, UTC, milliseconds, `Z`."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(epoch: float) -> str:
    """`epoch` seconds as an RFC 3339 UTC timestamp with milliseconds (`2026-11-29T08:00:00.123Z`)."""
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc(epoch_seconds: float) -> datetime:
    """Epoch seconds as an aware UTC datetime."""
    return datetime.fromtimestamp(epoch_seconds, UTC)
