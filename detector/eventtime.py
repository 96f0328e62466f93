"""The stream's event time (its watermark): how far the stream has got, robust to forged timestamps.

Event time closes idle sessions, resolves quiet alerts and ages out cross-client evidence, so one record
must not be able to move it: a timestamp ahead of the moment its record was received by more than the
allowed clock skew only moves the watermark as far as that receipt time plus the skew. (Records that are
further off still are dead letters; see `IngestSettings`.)
"""

from __future__ import annotations


class Watermark:
    """The newest plausible event time seen (epoch seconds); `value` is None before the first event.

    `max_skew_seconds` None trusts event times as they are (a dataset read offline has no receipt time).
    """

    def __init__(self, max_skew_seconds: float | None) -> None:
        self._max_skew = max_skew_seconds
        self._value = float("-inf")

    @property
    def value(self) -> float | None:
        """The watermark, or None when no event was observed yet."""
        return None if self._value == float("-inf") else self._value

    def observe(self, event_time: float, received_at: float) -> None:
        """Advance with one event stamped `event_time` and received at `received_at` (epoch seconds)."""
        if self._max_skew is not None:
            event_time = min(event_time, received_at + self._max_skew)
        if event_time > self._value:
            self._value = event_time
