"""Checking the sinks: one test notification to every configured receiver, and what each did with it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from detector.alerts.lifecycle import connectivity_check
from detector.alerts.sinks import DeliveryError, build_sinks
from detector.settings import Settings


@dataclass(frozen=True)
class SinkCheck:
    """What one sink did with the test notification: took it (`error` None), or failed with `error`, a
    line naming the sink, never its URL."""

    sink: str
    error: str | None = None

    @property
    def delivered(self) -> bool:
        """Whether the receiver accepted the test notification."""
        return self.error is None


def check_sinks(settings: Settings, now: datetime) -> Iterator[SinkCheck]:
    """Build every sink the settings configure and hand each, in turn, one test notification dated `now`
    (an alert of no attack, linking to the settings' dashboard); yield each sink's result as soon as it is
    known, in the order of `configured_sink_names`. Yields nothing when no sink is configured.

    A refused or failed delivery is a result, not an exception; nothing is written to the outbox. Every sink
    is closed once the iteration ends or is abandoned.
    """
    notification = connectivity_check(now, settings.dashboard.url)
    sinks = build_sinks(settings)
    try:
        for sink in sinks:
            try:
                sink.deliver(notification)
            except DeliveryError as exc:
                yield SinkCheck(sink.name, str(exc))
            else:
                yield SinkCheck(sink.name)
    finally:
        for sink in sinks:
            sink.close()
