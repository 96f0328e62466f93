"""The one failure every step and source shares: back-pressure."""

from __future__ import annotations


class Backpressure(Exception):
    """The pipeline cannot take more records now (the database is unreachable, the sinks are behind): the
    source must hold its records and offer them again later; nothing is lost.

    `retry_after` (seconds) is when to try again, if the cause knows; otherwise the caller's backoff decides.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
