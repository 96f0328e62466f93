"""Stopping a daemon: SIGTERM, SIGINT and SIGHUP (its terminal closed) set a flag the consumer loop looks
at, or interrupt a wait."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

# A terminal closing sends SIGHUP: the process stops as cleanly as on SIGTERM (and stops its broker).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(Exception):
    """A stop signal (`STOP_SIGNALS`) arrived inside `StopFlag.interruptible()`."""


class StopFlag:
    """Set by a stop signal (`STOP_SIGNALS`) or by code: the daemon finishes its batch, commits, returns."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._interruptible = False

    def set(self) -> None:
        """Ask the loop to stop after the current batch."""
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    @contextmanager
    def on_signals(self) -> Iterator[StopFlag]:
        """Within the block, SIGTERM, SIGINT and SIGHUP set the flag instead of killing the process."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handle(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            self.set()
            if self._interruptible:
                self._interruptible = False
                log.info("received %s while connecting: exiting", name)
                raise Interrupted(name)
            log.info("received %s: finishing the batch, committing, exiting", name)

        previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Within the block, a stop signal (under `on_signals`) also raises `Interrupted` at once, out of
        whatever blocks: for calls that wait without looking at the flag, such as kafka-python's clients
        connecting in their constructors. Raises `Interrupted` at the start when the flag is already set."""
        if self:
            raise Interrupted("stop requested")
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False
