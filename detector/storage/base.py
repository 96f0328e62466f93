"""What every repository shares: an engine on a supported backend, a clock, and closing."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Self

from sqlalchemy import Engine


class Repository:
    """Base of the repositories; `clock` returns the current time in epoch seconds, for the stamps written."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(
                f"unsupported database backend {engine.dialect.name!r}: use SQLite or PostgreSQL"
            )
        self._engine = engine
        self._clock = clock

    @property
    def engine(self) -> Engine:
        """The engine this repository reads and writes through (other repositories may share it)."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection (the repository can still be used: it reconnects on demand)."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
